"""SAE training speed: our step (sparse decode, sparse encoder backward) vs a plain dense-decode TopK.

Same run, same init, same data: d_in 1280, k 32, expansion 16 and 64 by default. Prints samples/s
and peak memory of each (peak RSS of a fresh process on CPU, max allocated on CUDA) with the
ratio ours / baseline; then the data module's read throughput from an activation store on disk
against the samples/s the training step consumes.

``--inits`` instead compares encoder inits on zoo activations (tiny-sd ``up_blocks.1`` tokens at
t = 25 of 256 shapes images, extracted here unless ``--zoo_store`` names such a store): every init
(``lstsq``, ``unit``, ``sparsify``; see ``SparseAutoencoder``) trains the same number of steps on the
same batches, then held-out FVU, L0 and the fraction of latents that never fire on the held-out
tokens are printed, for each k.

    python benchmarks/sae_train.py [--device cuda] [--batch 512] [--expansions 16 64] [--steps 2]
    python benchmarks/sae_train.py --inits [--ks 8 32] [--init_steps 1000] [--expansions 8]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae.model import SparseAutoencoder, fvu  # noqa: E402


class DenseTopK(nn.Module):
    """The baseline: TopK with ReLU, decoded by a dense (B x d_sae) @ (d_sae x d_in) matmul, plain autograd."""

    def __init__(self, ref: SparseAutoencoder):
        super().__init__()
        self.W_enc = nn.Parameter(ref.W_enc.detach().contiguous().clone())
        self.W_dec = nn.Parameter(ref.W_dec.detach().clone())
        self.b_enc = nn.Parameter(ref.b_enc.detach().clone())
        self.b_dec = nn.Parameter(ref.b_dec.detach().clone())
        self.k = ref.k

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(self.k, dim=1)
        z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        return {"loss": fvu(x, z @ self.W_dec + self.b_dec)}

    @torch.no_grad()
    def constrain(self) -> None:
        self.W_dec.grad -= (self.W_dec.grad * self.W_dec).sum(1, keepdim=True) * self.W_dec
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)


def time_steps(impl: str, d_in: int, expansion: int, k: int, batch: int, steps: int, device: str) -> dict:
    """Train ``steps`` timed steps (after one warm-up) of one implementation; returns samples/s, memory, first loss."""
    torch.manual_seed(0)
    ours = SparseAutoencoder(d_in, expansion * d_in, k).to(device)
    model = ours if impl == "ours" else DenseTopK(ours).to(device)
    if impl != "ours":
        del ours
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(1)
    xs = [torch.randn(batch, d_in, generator=g).to(device) for _ in range(2)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first, times = None, []
    for step in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.loss(xs[step % 2])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if impl == "ours":
            model.remove_parallel_grads()
            opt.step()
            model.set_decoder_unit_norm()
        else:
            model.constrain()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        first = float(out["loss"]) if first is None else first
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"samples_per_s": batch * steps / sum(times[1:]), "peak_bytes": peak, "first_loss": first}


def run_isolated(impl: str, args, expansion: int) -> dict:
    """One measurement in a fresh process, so that peak RSS belongs to that implementation alone."""
    cmd = [sys.executable, __file__, "--_one", impl, "--expansions", str(expansion), "--batch", str(args.batch),
           "--steps", str(args.steps), "--device", args.device, "--d_in", str(args.d_in), "--k", str(args.k)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def make_store(path: Path, n_images: int, d_in: int, hw: int) -> Path:
    """An activation store of random float16 (d_in, hw, hw) maps written with the extraction writer."""
    from extraction.store import ActSpec, Batch, StoreWriter, create_store

    ids = [f"img{i:05d}" for i in range(n_images)]
    spec = ActSpec("up_blocks.1", 25, (d_in, hw, hw), "NCHW", "output", (hw, hw))
    create_store(path, source_index=list(range(n_images)), source_ids=ids, specs=[spec],
                 attrs={"model": "synthetic", "dataset": "random", "config": "{}"}, storage_dtype="float16",
                 batch_size=32)
    w = StoreWriter(path)
    rng = np.random.default_rng(0)
    for i in range(0, n_images, 32):
        n = min(32, n_images - i)
        acts = rng.standard_normal((n, d_in, hw, hw), dtype=np.float32).astype(np.float16)
        w.write(Batch(np.arange(i, i + n), ids[i:i + n], np.full(n, -1), [""] * n, {("up_blocks.1", 25): acts},
                      np.zeros(0, dtype=np.int64)))
    w.finish()
    w.close()
    return path


def loader_throughput(store: Path, batch: int, workers: int) -> float:
    """Samples/s of one shuffled epoch of the training stream (tokens)."""
    from sae.data import StoreDataModule

    dm = StoreDataModule(str(store), "up_blocks.1", 25, samples="tokens", batch_size=batch, val_fraction=0.0,
                         chunk_images=8, buffer_chunks=4, num_workers=workers, check_finite=False)
    dm.setup()
    t0 = time.perf_counter()
    n = sum(x.shape[0] for x, _ in dm.train_dataloader())
    return n / (time.perf_counter() - t0)


def zoo_tokens(store: Path | None, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) tiny-sd up_blocks.1 tokens at t = 25, split by image (10% held out, seed 0)."""
    from sae.data import StoreDataModule, read_samples

    from extraction.store import open_store

    if store is None:
        from revelio.commands.extract import ExtractConfig, extract_cmd
        from revelio.config import load

        store = tmp / "tiny-sd.h5"
        cfg = load(ExtractConfig, overrides={
            "model": {"id": "tiny-sd"}, "data": {"name": "shapes", "size": 64, "count": 256, "seed": 0},
            "hooks": ["up_blocks.1"], "timesteps": [25], "capture": "output", "pooling": "none", "prompt": "empty",
            "storage_dtype": "float32", "batch_size": 32, "seed": 0, "out": str(store), "progress": False})
        extract_cmd(cfg)
    dm = StoreDataModule(str(store), "up_blocks.1", 25, samples="tokens", val_fraction=0.1, seed=0, check_finite=False)
    dm.setup()
    with open_store(store) as st:
        train = read_samples(st, "up_blocks.1", 25, dm.train_rows, "tokens")[0]
        val = read_samples(st, "up_blocks.1", 25, dm.val_rows, "tokens")[0]
    return torch.from_numpy(np.asarray(train, dtype=np.float32)), torch.from_numpy(np.asarray(val, dtype=np.float32))


def train_init(init: str, train: torch.Tensor, val: torch.Tensor, k: int, expansion: int, steps: int, batch: int,
               device: str, arch: str = "topk", seed: int = 0) -> dict:
    """The Lightning module's step (Adam, Gao et al.'s lr, 100 warm-up steps, AuxK) as a plain loop."""
    d_in = train.shape[1]
    d_sae = expansion * d_in
    m = SparseAutoencoder(d_in, d_sae, k, architecture=arch, dead_after=100 * batch, encoder_init=init,
                          seed=seed).to(device)
    g = torch.Generator().manual_seed(seed)
    m.init_from_data(train[torch.randperm(len(train), generator=g)[:16384]].to(device), "geometric_median")
    lr = 2e-4 / math.sqrt(d_sae / 2**14)
    opt = torch.optim.Adam(m.parameters(), lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))

    def held_out() -> tuple[float, float, float]:
        with torch.no_grad():
            xv = val.to(device) * m.norm_scale
            codes = m.encode_sparse(xv)
            x_hat = m.decode_sparse(codes)
            fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
            fired[codes.latents[codes.values > 0]] = True
            return float(fvu(xv, x_hat)), float(codes.l0(len(xv))), 1 - float(fired.float().mean())

    step0 = held_out()[0]
    for step in range(steps):
        idx = torch.randint(len(train), (batch,), generator=g)
        out = m.loss(train[idx].to(device))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        m.remove_parallel_grads()
        opt.step()
        sched.step()
        m.set_decoder_unit_norm()
        m.update_dead_counters(out["fires"] > 0, batch)
    f, l0, never = held_out()
    return {"step0_fvu": step0, "fvu": f, "l0": l0, "never_fire": never}


def compare_inits(args) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        train, val = zoo_tokens(Path(args.zoo_store) if args.zoo_store else None, Path(tmp))
    e = args.expansions[0]
    print(f"encoder inits on tiny-sd up_blocks.1 tokens (t=25): {len(train)} train / {len(val)} held-out tokens, "
          f"d_in {train.shape[1]}, d_sae {e * train.shape[1]}, batch {args.batch}, {args.init_steps} steps, "
          f"device {args.device}, seeds {args.seeds} (init and batch order; mean, and min-max over seeds)")
    print(f"{'k':>4} {'init':>9} {'step-0 FVU':>10} {'held-out FVU':>12} {'(min-max)':>15} {'L0':>6} {'never fire':>10}")
    for k in args.ks:
        for init in ("lstsq", "unit", "sparsify"):
            rs = [train_init(init, train, val, k, e, args.init_steps, args.batch, args.device, seed=s)
                  for s in args.seeds]
            mean = {key: float(np.mean([r[key] for r in rs])) for key in rs[0]}
            f = [r["fvu"] for r in rs]
            print(f"{k:>4} {init:>9} {mean['step0_fvu']:>10.4f} {mean['fvu']:>12.4f} "
                  f"{f'({min(f):.4f}-{max(f):.4f})':>15} {mean['l0']:>6.2f} {mean['never_fire']:>10.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d_in", type=int, default=1280)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--expansions", type=int, nargs="+", default=[16, 64])
    p.add_argument("--store_images", type=int, default=192)
    p.add_argument("--inits", action="store_true", help="compare encoder inits on zoo activations instead")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32])
    p.add_argument("--init_steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--zoo_store", default=None, help="a store with tiny-sd up_blocks.1 at t=25 (else extracted)")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inits:
        compare_inits(args)
        return
    if args._one:
        print(json.dumps(time_steps(args._one, args.d_in, args.expansions[0], args.k, args.batch, args.steps, args.device)))
        return
    print(f"SAE training step, d_in {args.d_in}, k {args.k}, batch {args.batch}, {args.steps} timed steps, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'expansion':>9} {'d_sae':>7} {'impl':>14} {'samples/s':>10} {'peak MiB':>9} {'first loss':>10}")
    consumed = {}
    for e in args.expansions:
        res = {impl: run_isolated(impl, args, e) for impl in ("dense-baseline", "ours")}
        for impl, r in res.items():
            print(f"{e:>9} {e * args.d_in:>7} {impl:>14} {r['samples_per_s']:>10.0f} {r['peak_bytes'] / 2**20:>9.0f} "
                  f"{r['first_loss']:>10.5f}")
        b, o = res["dense-baseline"], res["ours"]
        print(f"{'':>9} {'':>7} {'ours/baseline':>14} {o['samples_per_s'] / b['samples_per_s']:>9.2f}x "
              f"{o['peak_bytes'] / b['peak_bytes']:>8.2f}x  (same init: |first loss diff| "
              f"{abs(o['first_loss'] - b['first_loss']):.1e})")
        consumed[e] = o["samples_per_s"]
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "bench.h5", args.store_images, args.d_in, 8)
        size = store.stat().st_size / 2**20
        print(f"\ndata module: tokens of a {args.store_images}-image store ({args.d_in} x 8 x 8 float16, {size:.0f} MiB "
              f"on disk), batch {args.batch}")
        for workers in (0, 2):
            rate = loader_throughput(store, args.batch, workers)
            ratios = ", ".join(f"{rate / consumed[e]:.1f}x the step at expansion {e}" for e in consumed)
            print(f"  num_workers {workers}: {rate:>9.0f} samples/s read = {ratios}")


if __name__ == "__main__":
    main()
