"""SAEs across denoising timesteps: one SAE per t, one pooled SAE, and the timestep-aware SAE.

Zoo activations: tiny-sd ``up_blocks.1`` tokens (64-dim, 16 x 16 per image) at t = 25, 250, 500 of
256 shapes images, extracted here unless ``--zoo_store`` names such a store; 10% of the images
held out (the same images at every t). At equal total latents and equal total optimizer steps:

    (a) per-t     one SAE per timestep, d_sae = latents / T each, steps / T steps each on its t
    (b) pooled    one SAE of ``latents`` latents on the tokens of all timesteps mixed, ``steps`` steps
    (c) t-aware   (b) plus a learned per-timestep scale and bias of each latent's pre-activation
                  (``timestep_conditioning="scale_bias"``), same batches as (b)

Every run is the Lightning module's step as a plain loop (Adam with the module's default lr for its
d_sae, 100 warm-up steps, AuxK, lstsq encoder init, geometric-median b_dec). Printed: held-out FVU at
each t (SSE / SST of that timestep's held-out tokens), L0, and for (b) and (c) how many latents stay
monosemantic across t: of the latents that fire on the images at every t, those whose top-16 images
(by max activation over an image's tokens, over all 256 images) overlap with Jaccard > 0.5 between
every pair of timesteps (two random 16-image sets of 256 have Jaccard about 0.03).

    python benchmarks/sae_timesteps.py [--zoo_store S.h5] [--latents 768] [--k 8] [--steps 1500] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae.model import SparseAutoencoder  # noqa: E402

HOOK = "up_blocks.1"
TS = [25, 250, 500]


def zoo_store(path: Path | None, tmp: Path, images: int) -> Path:
    """A store with tiny-sd up_blocks.1 at t = 25, 250, 500 (extracted into ``tmp`` when not given)."""
    if path is not None:
        return path
    from revelio.commands.extract import ExtractConfig, extract_cmd
    from revelio.config import load

    store = tmp / "tiny-sd-ts.h5"
    cfg = load(ExtractConfig, overrides={
        "model": {"id": "tiny-sd"}, "data": {"name": "shapes", "size": 64, "count": images, "seed": 0},
        "hooks": [HOOK], "timesteps": TS, "capture": "output", "pooling": "none", "prompt": "caption",
        "storage_dtype": "float32", "batch_size": 32, "seed": 0, "out": str(store), "progress": False})
    t0 = time.time()
    extract_cmd(cfg)
    print(f"extracted {images} images x {len(TS)} timesteps in {time.time() - t0:.0f} s", flush=True)
    return store


def load_tokens(store: Path) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray, int]:
    """Tokens (n_images * P, C) of every timestep, the train / held-out image rows (the data module's split)."""
    from extraction.store import open_store
    from sae.data import StoreDataModule, read_samples

    dm = StoreDataModule(str(store), HOOK, TS, samples="tokens", val_fraction=0.1, seed=0, check_finite=False)
    dm.setup()
    rows = np.sort(np.concatenate([dm.train_rows, dm.val_rows]))
    with open_store(store) as st:
        xs = [torch.from_numpy(np.asarray(read_samples(st, HOOK, t, rows, "tokens")[0], dtype=np.float32)) for t in TS]
    assert (rows == np.arange(len(rows))).all()
    return xs, dm.train_rows, dm.val_rows, dm.per_image


def token_index(rows: np.ndarray, P: int) -> torch.Tensor:
    return torch.from_numpy((rows[:, None] * P + np.arange(P)[None]).reshape(-1))


def train(xs: list[torch.Tensor], tix_of: list[int], train_idx: torch.Tensor, d_sae: int, k: int, steps: int,
          batch: int, seed: int, conditioning: str = "none") -> SparseAutoencoder:
    """The Lightning module's step as a plain loop, on batches drawn uniformly from the train tokens of the
    timesteps ``tix_of`` (pooled); batches depend on the seed only, so (b) and (c) see the same ones."""
    d_in = xs[0].shape[1]
    cond = conditioning != "none"
    m = SparseAutoencoder(d_in, d_sae, k, dead_after=100 * batch, seed=seed,
                          timesteps=[TS[i] for i in tix_of] if cond else None, timestep_conditioning=conditioning)
    g = torch.Generator().manual_seed(seed)
    pool = torch.cat([xs[i][train_idx] for i in tix_of])
    pool_t = torch.cat([torch.full((len(train_idx),), j) for j in range(len(tix_of))])
    m.init_from_data(pool[torch.randperm(len(pool), generator=g)[:16384]], "geometric_median")
    lr = 2e-4 / math.sqrt(d_sae / 2**14)
    opt = torch.optim.Adam(m.parameters(), lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    for _ in range(steps):
        idx = torch.randint(len(pool), (batch,), generator=g)
        out = m.loss(pool[idx], t_index=pool_t[idx] if cond else None)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        m.remove_parallel_grads()
        opt.step()
        sched.step()
        m.set_decoder_unit_norm()
        m.update_dead_counters(out["fires"] > 0, batch)
    return m.eval()


@torch.no_grad()
def held_out(m: SparseAutoencoder, x: torch.Tensor, t_index: int | None) -> tuple[float, float]:
    """(FVU, L0) on held-out tokens of one timestep (SSE / SST of those tokens)."""
    xn = x * m.norm_scale
    codes = m.encode_sparse(xn, t_index=None if t_index is None else torch.full((len(x),), t_index))
    x_hat = m.decode_sparse(codes)
    sst = (xn - xn.mean(0)).pow(2).sum()
    return float((xn - x_hat).pow(2).sum() / sst), float(codes.l0(len(x)))


@torch.no_grad()
def image_scores(m: SparseAutoencoder, x: torch.Tensor, P: int, t_index: int | None, block: int = 64) -> torch.Tensor:
    """(n_images, d_sae): each latent's max activation over each image's tokens."""
    n = len(x) // P
    out = torch.zeros(n, m.d_sae)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        xb = x[lo * P:hi * P] * m.norm_scale
        codes = m.encode_sparse(xb, t_index=None if t_index is None else torch.full((len(xb),), t_index))
        z = codes.dense(len(xb), m.d_sae)
        out[lo:hi] = z.view(hi - lo, P, m.d_sae).amax(1)
    return out


def stability(m: SparseAutoencoder, xs: list[torch.Tensor], P: int, conditioned: bool, top: int = 16
              ) -> dict[str, float]:
    """Latents alive at every t (firing on some image), and those whose top-``top`` images agree across t."""
    scores = [image_scores(m, x, P, i if conditioned else None) for i, x in enumerate(xs)]
    alive = torch.stack([(s > 0).sum(0) >= top for s in scores]).all(0)  # fires on >= top images at every t
    tops = [s.topk(top, dim=0).indices.T for s in scores]  # (d_sae, top)
    jac = []
    for a, b in itertools.combinations(range(len(xs)), 2):
        j = torch.zeros(m.d_sae)
        for f in torch.nonzero(alive).flatten().tolist():
            sa, sb = set(tops[a][f].tolist()), set(tops[b][f].tolist())
            j[f] = len(sa & sb) / len(sa | sb)
        jac.append(j)
    J = torch.stack(jac)  # (pairs, d_sae)
    stable = alive & (J > 0.5).all(0)
    med = [float(J[p][alive].median()) if alive.any() else float("nan") for p in range(len(jac))]
    return {"alive": int(alive.sum()), "stable": int(stable.sum()), "median_jaccard": med}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo_store", default=None, help="a store with tiny-sd up_blocks.1 at t = 25, 250, 500")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--latents", type=int, default=768, help="total latents of each method")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=1500, help="total optimizer steps of each method")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = zoo_store(Path(args.zoo_store) if args.zoo_store else None, Path(tmp), args.images)
        xs, train_rows, val_rows, P = load_tokens(store)
    tr, va = token_index(train_rows, P), token_index(val_rows, P)
    T = len(TS)
    print(f"tiny-sd {HOOK} tokens at t = {TS}: {len(tr)} train / {len(va)} held-out tokens per t "
          f"({len(train_rows)} / {len(val_rows)} images), d_in {xs[0].shape[1]}, k {args.k}, {args.latents} latents "
          f"and {args.steps} steps per method, batch {args.batch}, seeds {args.seeds}", flush=True)
    res: dict[str, list] = {"(a) per-t": [], "(b) pooled": [], "(c) t-aware": []}
    stab: dict[str, list] = {"(b) pooled": [], "(c) t-aware": []}
    for seed in args.seeds:
        row = []
        for i in range(T):
            m = train(xs, [i], tr, args.latents // T, args.k, args.steps // T, args.batch, seed)
            row.append(held_out(m, xs[i][va], None))
        res["(a) per-t"].append(row)
        for name, cond in (("(b) pooled", "none"), ("(c) t-aware", "scale_bias")):
            m = train(xs, list(range(T)), tr, args.latents, args.k, args.steps, args.batch, seed, cond)
            res[name].append([held_out(m, xs[i][va], i if cond != "none" else None) for i in range(T)])
            stab[name].append(stability(m, xs, P, cond != "none"))
        print(f"seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    head = "".join(f"{f'FVU t={t}':>11}" for t in TS)
    print(f"\n{'method':<13}{'latents':>8}{'steps':>7}{head}{'mean':>8}{'(min-max over seeds)':>22}{'L0':>6}")
    for name, runs in res.items():
        a = np.array(runs)  # (seeds, T, 2)
        lat = f"{T}x{args.latents // T}" if name.startswith("(a)") else str(args.latents)
        st = f"{T}x{args.steps // T}" if name.startswith("(a)") else str(args.steps)
        fv = a[..., 0].mean(0)
        per_seed = a[..., 0].mean(1)
        print(f"{name:<13}{lat:>8}{st:>7}" + "".join(f"{v:>11.4f}" for v in fv)
              + f"{fv.mean():>8.4f}{f'({per_seed.min():.4f}-{per_seed.max():.4f})':>22}{a[..., 1].mean():>6.2f}")
    diff = np.array(res["(c) t-aware"])[..., 0].mean(1) - np.array(res["(b) pooled"])[..., 0].mean(1)
    print("(c) - (b) mean FVU per seed (same init and batches): " + " ".join(f"{d:+.4f}" for d in diff))
    pairs = ", ".join(f"{a}/{b}" for a, b in itertools.combinations(TS, 2))
    print(f"\nlatents stable across t (top-16 images, Jaccard > 0.5 for every pair of t), of those alive at every t; "
          f"median Jaccard per pair ({pairs}); mean over seeds")
    for name, runs in stab.items():
        alive = np.mean([r["alive"] for r in runs])
        stable = np.mean([r["stable"] for r in runs])
        med = np.mean([r["median_jaccard"] for r in runs], axis=0)
        lo, hi = min(r["stable"] for r in runs), max(r["stable"] for r in runs)
        print(f"{name:<13} alive at all t {alive:6.1f} / {args.latents}   stable {stable:6.1f} ({lo}-{hi}; "
              f"{stable / max(alive, 1):.0%} of alive)   median Jaccard " + " ".join(f"{v:.2f}" for v in med))
    print(f"\n(total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
