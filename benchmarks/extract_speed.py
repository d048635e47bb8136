"""Extraction speed: hooked extraction vs the bare denoiser forward pass, on the same batches, in one run.

For each zoo model: the same noisy latents and conditioning go through
  bare    the denoiser forward alone (no hooks) - the baseline;
  hooked  the forward with the shipped config's hooks, activations copied off the graph and handed
          to the store's writer thread, which writes them to HDF5 (the extraction hot loop);
and, end to end, ``Extractor.run`` on the images (VAE encode, prompts, noise, forward, store).
Bare and hooked alternate batch by batch (and which goes first) so machine load hits both alike.
Each hooked batch's write is drained before the next measurement: the ratio counts what the
compute path pays (hooks, copy off the graph, queueing); the worst case adds the write time too.
Also printed: bytes/s written and the process RSS after 1x and 2x the images (flat = no accumulation).

    python benchmarks/extract_speed.py [--images 64] [--batch 16] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This file is named like the `extraction` package; keep its folder from shadowing the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from extraction.adapters import sample_generators  # noqa: E402
from extraction.run import ExtractionPlan, Extractor  # noqa: E402
from extraction.store import AsyncWriter, Batch, StoreWriter, create_store  # noqa: E402
from revelio.datasets import Shapes  # noqa: E402
from revelio.zoo import load_pipeline  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "extract"


def prepare(ex, ds, batch):
    """The same inputs for both paths: clean latents, conditioning and samples per batch."""
    ad, out = ex.adapter, []
    samples = list(ds.iter_samples())
    for i in range(0, len(samples), batch):
        part = samples[i:i + batch]
        lat = ad.encode_images(ad.preprocess([s.image for s in part], ds.size))
        out.append((lat, [s.id for s in part], ex._cond([""] * len(part)), part))
    return out


def bare(ex, lat, ids, cond) -> float:
    """Noise + denoiser forward per timestep, no hooks: the baseline."""
    ad, t0 = ex.adapter, time.perf_counter()
    with torch.no_grad():
        for t in ex.plan.timesteps:
            ad.forward(ad.noise(lat, t, sample_generators(ex.plan.seed, ids, t)), t, cond)
    return time.perf_counter() - t0


class Hooked:
    """The extraction hot loop into one store: hooked forwards, then the batch goes to the writer thread."""

    def __init__(self, ex, batches, path, specs):
        """Create the store skeleton up front: it is made once per run, not per batch."""
        self.ex, self.row = ex, 0
        n = sum(len(b[1]) for b in batches)
        create_store(path, source_index=list(range(n)), source_ids=[s.id for b in batches for s in b[3]],
                     specs=specs, attrs={}, storage_dtype="float32", batch_size=len(batches[0][1]))
        self.aw = AsyncWriter(StoreWriter(path))

    def batch(self, lat, ids, cond, part) -> tuple[float, float]:
        """(seconds to compute and queue one batch, seconds its write then still needed).

        The writer runs while the loop computes the next batch; here the write is drained before the
        next measurement so it never slows the bare pass. Adding both is the no-overlap worst case.
        """
        t0 = time.perf_counter()
        acts = self.ex.capture_batch(lat, ids, cond)
        self.aw.put(Batch(positions=np.arange(self.row, self.row + len(ids)), ids=ids,
                          labels=np.array([s.label for s in part]), captions=[s.caption for s in part],
                          acts={k: v.numpy() for k, v in acts.items()}, skipped_positions=np.zeros(0, np.int64)))
        t1 = time.perf_counter()
        self.aw.drain()
        self.row += len(ids)
        return t1 - t0, time.perf_counter() - t1

    def close(self) -> int:
        self.aw.close()
        self.aw.writer.close()
        return self.aw.bytes_written


class RSSPeak:
    """Peak resident memory of this process while the block runs (sampled every 10 ms)."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        self.th = threading.Thread(target=self._loop, daemon=True)
        self.th.start()
        return self

    def _loop(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *a):
        self.stop = True
        self.th.join()


def end_to_end(pipe, name, hooks, timesteps, images, batch, tmp) -> tuple[float, int]:
    plan = ExtractionPlan(hooks=hooks, timesteps=timesteps, out=str(tmp / f"{name}-e2e.h5"), batch_size=batch,
                          progress=False, storage_dtype="float32")
    ds = Shapes(size=64, count=images, seed=1)
    with RSSPeak() as m:
        t0 = time.perf_counter()
        Extractor(pipe, plan).run(ds, tmp / f"{name}-e2e-{images}.h5")
        secs = time.perf_counter() - t0
    return secs, m.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
          f"{args.images} images, batch {args.batch}, {args.rounds} rounds (mean)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in ("tiny-sd", "tiny-flux"):
            cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
            hooks, timesteps = cfg["hooks"], cfg["timesteps"]
            pipe = load_pipeline(name)
            ex = Extractor(pipe, ExtractionPlan(hooks=hooks, timesteps=timesteps, out="", storage_dtype="float32"))
            batches = prepare(ex, Shapes(size=64, count=args.images, seed=0), args.batch)
            bare(ex, *batches[0][:3])  # warm-up of both paths; the hooked one also gives the store layout
            specs = ex.specs(ex.capture_batch(*batches[0][:3]))
            b_sec, h_sec, w_sec, written = 0.0, 0.0, 0.0, 0
            for r in range(args.rounds):  # bare and hooked alternate batch by batch: load changes hit both
                hk = Hooked(ex, batches, tmp / f"{name}-{r}.h5", specs)
                for i, (lat, ids, cond, part) in enumerate(batches):
                    if (i + r) % 2:  # alternate which goes first, so neither always follows the other
                        hs, ws = hk.batch(lat, ids, cond, part)
                        b_sec += bare(ex, lat, ids, cond)
                    else:
                        b_sec += bare(ex, lat, ids, cond)
                        hs, ws = hk.batch(lat, ids, cond, part)
                    h_sec, w_sec = h_sec + hs, w_sec + ws
                written = hk.close()
            b, h, w = b_sec / args.rounds, h_sec / args.rounds, w_sec / args.rounds
            n = args.images
            print(f"{name}: hooks {hooks} x timesteps {timesteps}")
            print(f"  bare denoiser forward : {n / b:8.1f} img/s ({len(batches) * len(timesteps)} calls)")
            print(f"  hooked extraction     : {n / h:8.1f} img/s  ratio hooked/bare = {b / h:.3f} (target >= 0.9; "
                  f"writes overlapped by the writer thread)")
            print(f"  hooked + write, no overlap: {n / (h + w):8.1f} img/s  ratio = {b / (h + w):.3f} (worst case)")
            print(f"  written               : {written / 1e6:.1f} MB, {written / max(w, 1e-9) / 1e6:.1f} MB/s "
                  f"(writer thread's own time)")
            e1, m1 = end_to_end(pipe, name, hooks, timesteps, n, args.batch, tmp)
            e2, m2 = end_to_end(pipe, name, hooks, timesteps, 2 * n, args.batch, tmp)
            print(f"  end to end (VAE+text+noise+forward+store): {2 * n / e2:8.1f} img/s, "
                  f"ratio to bare forward = {(2 * n / e2) / (n / b):.3f}")
            print(f"  peak RSS: {m1 / 2**20:.0f} MiB after {n} images, {m2 / 2**20:.0f} MiB after {2 * n} images")


if __name__ == "__main__":
    main()
