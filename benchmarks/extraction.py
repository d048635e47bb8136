"""Extraction speed: hooked extraction vs the bare denoiser forward pass, on the same batches, in one run.

For each zoo model: the same noisy latents and conditioning go through
  bare    the denoiser forward alone (no hooks) - the baseline;
  hooked  the forward with the shipped config's hooks, activations copied off the graph and handed
          to the store's writer thread, which writes them to HDF5 (the extraction hot loop);
and, end to end, ``Extractor.run`` on the images (VAE encode, prompts, noise, forward, store).
Rounds alternate bare/hooked so machine load hits both alike; the median round is reported.
Also printed: bytes/s written and the process RSS after 1x and 2x the images (flat = no accumulation).

    python benchmarks/extraction.py [--images 64] [--batch 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This file is named like the `extraction` package; keep its folder from shadowing the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from extraction.adapters import get_adapter, sample_generators  # noqa: E402
from extraction.hooks import ActivationCapture  # noqa: E402
from extraction.run import ExtractionPlan, Extractor  # noqa: E402
from extraction.store import ActSpec, AsyncWriter, Batch, StoreWriter, create_store  # noqa: E402
from revelio.datasets import Shapes  # noqa: E402
from revelio.zoo import load_pipeline  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "extract"


def prepare(ad, ds, timesteps, batch, seed=0):
    """The same inputs for both paths: (noisy latents, t, cond, ids, labels, captions) per call."""
    calls = []
    samples = list(ds.iter_samples())
    for i in range(0, len(samples), batch):
        part = samples[i:i + batch]
        ids = [s.id for s in part]
        lat = ad.encode_images(ad.preprocess([s.image for s in part], ds.size))
        cond = ad.encode_prompts([""] * len(part))
        for t in timesteps:
            calls.append((ad.noise(lat, t, sample_generators(seed, ids, t)), t, cond, ids, part))
    return calls


def bare(ad, calls) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for noisy, t, cond, *_ in calls:
            ad.forward(noisy, t, cond)
    return time.perf_counter() - t0


def hooked(ad, calls, hooks, timesteps, path) -> tuple[float, int]:
    """Forward with hooks; each batch's activations (all timesteps) go to the writer thread -> HDF5."""
    t0 = time.perf_counter()
    aw = None
    row = 0
    with ActivationCapture(ad, hooks) as cap:
        for k in range(0, len(calls), len(timesteps)):
            acts = {}
            for noisy, t, cond, ids, part in calls[k:k + len(timesteps)]:
                cap.reset(ad.n_image_tokens(noisy))
                ad.forward(noisy, t, cond)
                acts.update({(h, t): cap.acts[h] for h in hooks})
            if aw is None:
                n = len(calls) // len(timesteps) * len(ids)
                specs = [ActSpec(h, t, tuple(x.shape[1:]), "NCHW" if x.ndim == 4 else "NTC", "output", (0, 0))
                         for (h, t), x in acts.items()]
                create_store(path, source_index=list(range(n)), source_ids=[str(i) for i in range(n)], specs=specs,
                             attrs={}, storage_dtype="float32", batch_size=len(ids))
                aw = AsyncWriter(StoreWriter(path))
            aw.put(Batch(positions=torch.arange(row, row + len(ids)).numpy(), ids=ids,
                         labels=torch.tensor([s.label for s in part]).numpy(), captions=[s.caption for s in part],
                         acts={key: v.numpy() for key, v in acts.items()},
                         skipped_positions=torch.zeros(0, dtype=torch.long).numpy()))
            row += len(ids)
    aw.close()
    aw.writer.close()
    return time.perf_counter() - t0, aw.bytes_written


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
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
          f"{args.images} images, batch {args.batch}, {args.rounds} rounds (median)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in ("tiny-sd", "tiny-flux"):
            cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
            hooks, timesteps = cfg["hooks"], cfg["timesteps"]
            pipe = load_pipeline(name)
            ad = get_adapter(pipe)
            calls = prepare(ad, Shapes(size=64, count=args.images, seed=0), timesteps, args.batch)
            bare(ad, calls[:2])  # warm-up
            b_times, h_times, written = [], [], 0
            for r in range(args.rounds):
                b_times.append(bare(ad, calls))
                secs, written = hooked(ad, calls, hooks, timesteps, tmp / f"{name}-{r}.h5")
                h_times.append(secs)
            b, h = statistics.median(b_times), statistics.median(h_times)
            n = args.images
            print(f"{name}: hooks {hooks} x timesteps {timesteps}")
            print(f"  bare denoiser forward : {n / b:8.1f} img/s ({len(calls)} calls)")
            print(f"  hooked extraction     : {n / h:8.1f} img/s  ratio hooked/bare = {b / h:.3f} (target >= 0.9)")
            print(f"  written               : {written / 1e6:.1f} MB, {written / h / 1e6:.1f} MB/s")
            e1, m1 = end_to_end(pipe, name, hooks, timesteps, n, args.batch, tmp)
            e2, m2 = end_to_end(pipe, name, hooks, timesteps, 2 * n, args.batch, tmp)
            print(f"  end to end (VAE+text+noise+forward+store): {2 * n / e2:8.1f} img/s, "
                  f"ratio to bare forward = {(2 * n / e2) / (n / b):.3f}")
            print(f"  peak RSS: {m1 / 2**20:.0f} MiB after {n} images, {m2 / 2**20:.0f} MiB after {2 * n} images")


if __name__ == "__main__":
    main()
