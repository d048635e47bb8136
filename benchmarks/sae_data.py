"""Read path of the SAE data module against the raw read of the same bytes, in one run on the same stores.

For each synthetic store (written with the extraction writer, NCHW maps like the UNet hooks: d_in 64 at
16 x 16 and d_in 1280 at 8 x 8, float16 and float32) it measures

* raw h5py: ``read_direct`` of the whole dataset, 64 images per call, into one reused buffer;
* np.memmap: the same bytes (the chunks lie back to back in the file) copied block by block;
* the data module's shuffled training iterator: pooled, tokens from the store's shuffle buffers
  (``token_cache=False``) and tokens from the pre-shuffled token cache (the default), each with 0 and 2
  DataLoader workers; the one-off cache build is timed separately (``build s``),

and prints tokens/s (pooled: vectors/s), MB/s of store bytes consumed and the ratio module / raw h5py,
where the raw read is measured again right before and after each module figure (best of the two), so a
ratio compares readings taken under the same machine load.
Each figure is the best of ``--passes`` whole passes (worker start-up included) from the page cache
(every store, and every token cache after its build, is read once untimed before). ``--rss`` adds the RSS growth
during one training pass over a store 1x and 8x the size, in fresh processes, with the same shuffle buffer.

    python benchmarks/sae_data.py [--images64 2048] [--images1280 4096] [--batch 4096] [--rss]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOOK, T = "up_blocks.1", 25


def make_store(path: Path, n_images: int, d_in: int, hw: int, dtype: str) -> Path:
    """An activation store of random (d_in, hw, hw) maps written with the extraction writer."""
    from extraction.store import ActSpec, Batch, StoreWriter, create_store

    ids = [f"img{i:05d}" for i in range(n_images)]
    spec = ActSpec(HOOK, T, (d_in, hw, hw), "NCHW", "output", (hw, hw))
    create_store(path, source_index=list(range(n_images)), source_ids=ids, specs=[spec],
                 attrs={"model": "synthetic", "dataset": "random", "config": "{}"}, storage_dtype=dtype, batch_size=16)
    w = StoreWriter(path)
    rng = np.random.default_rng(0)
    for i in range(0, n_images, 64):
        n = min(64, n_images - i)
        acts = rng.standard_normal((n, d_in, hw, hw), dtype=np.float32).astype(dtype)
        w.write(Batch(np.arange(i, i + n), ids[i:i + n], np.full(n, -1), [""] * n, {(HOOK, T): acts},
                      np.zeros(0, dtype=np.int64)))
    w.finish()
    w.close()
    return path


def raw_h5py(path: Path, block: int = 64) -> float:
    """Seconds to read the whole dataset with h5py, ``block`` images per read into one buffer."""
    with h5py.File(path, "r") as f:
        ds = f[f"acts/{HOOK}/t{T}"]
        buf = np.empty((block, *ds.shape[1:]), ds.dtype)
        t0 = time.perf_counter()
        for lo in range(0, ds.shape[0], block):
            hi = min(ds.shape[0], lo + block)
            ds.read_direct(buf, np.s_[lo:hi], np.s_[0:hi - lo])
        return time.perf_counter() - t0


def raw_memmap(path: Path, block: int = 64) -> float:
    """Seconds to copy the same bytes out of np.memmaps of the file (offsets from the HDF5 chunk index)."""
    from sae.data import _map_dataset

    with h5py.File(path, "r") as f:
        ds = f[f"acts/{HOOK}/t{T}"]
        m = _map_dataset(str(path), ds)
        if m is None:
            raise SystemExit(f"{path}: the dataset is not stored as whole rows")
        segments, shape, dtype = m[0], ds.shape, ds.dtype
        del m
    buf = np.empty((block, *shape[1:]), dtype)
    t0 = time.perf_counter()
    for r0, r1, off in segments:
        mm = np.memmap(path, dtype=dtype, mode="r", offset=off, shape=(r1 - r0, *shape[1:]))
        for lo in range(0, r1 - r0, block):
            hi = min(r1 - r0, lo + block)
            np.copyto(buf[:hi - lo], mm[lo:hi])
        del mm
    return time.perf_counter() - t0


def module_pass(path: Path, samples: str, workers: int, batch: int, token_cache: bool, passes: int,
                chunk_images: int = 64, buffer_chunks: int = 4) -> tuple[float, int, float]:
    """(best samples/s over ``passes`` whole shuffled training passes, samples per pass, seconds of set-up,
    which includes building the token cache when it does not exist yet)."""
    from sae.data import StoreDataModule

    dm = StoreDataModule(str(path), HOOK, T, samples=samples, batch_size=batch, val_fraction=0.1,
                         chunk_images=chunk_images, buffer_chunks=buffer_chunks, num_workers=workers,
                         check_finite=False, token_cache=token_cache, pin_memory=False)
    t0 = time.perf_counter()
    dm.setup()
    t_setup = time.perf_counter() - t0
    best, total = 0.0, 0
    for k in range(passes + 1):  # pass 0 is untimed: the files just written (a fresh token cache) reach the
        n, t0 = 0, time.perf_counter()  # page cache and finish write-back, as the raw read's store did before
        for x, _r in dm.loader(dm.train_rows, shuffle=True):
            n += x.shape[0]
        if k:
            best = max(best, n / (time.perf_counter() - t0))
        total = n
    return best, total, t_setup


def rss_child(path: str, samples: str, token_cache: bool) -> None:
    """One training pass in this fresh process; prints the largest RSS after any batch minus RSS after set-up."""
    from sae.data import StoreDataModule

    dm = StoreDataModule(path, HOOK, T, samples=samples, batch_size=1024 if samples == "tokens" else 16,
                         val_fraction=0.1, chunk_images=16,
                         buffer_chunks=4, num_workers=0, check_finite=False, token_cache=token_cache)
    dm.setup()
    proc = psutil.Process()
    before = peak = proc.memory_info().rss
    n = 0
    for x, _ in dm.loader(dm.train_rows, shuffle=True):
        n += x.shape[0]
        peak = max(peak, proc.memory_info().rss)
    print(json.dumps({"samples": n, "growth": peak - before, "peak": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images64", type=int, default=2048, help="images of the d_in 64 (16 x 16) stores")
    p.add_argument("--images1280", type=int, default=4096, help="images of the d_in 1280 (8 x 8) stores")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    p.add_argument("--d_ins", type=int, nargs="+", default=[64, 1280], choices=[64, 1280])
    p.add_argument("--rss", action="store_true", help="also measure RSS growth on stores 1x and 8x the size")
    p.add_argument("--_rss", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._rss:
        rss_child(args._rss[0], args._rss[1], args._rss[2] == "1")
        return
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.1f} at start; batch {args.batch}, best of {args.passes} passes, page cache")
    with tempfile.TemporaryDirectory() as tmp:
        for d_in, hw, n in [c for c in ((64, 16, args.images64), (1280, 8, args.images1280)) if c[0] in args.d_ins]:
            for dtype in args.dtypes:
                path = make_store(Path(tmp) / f"d{d_in}-{dtype}.h5", n, d_in, hw, dtype)
                item = np.dtype(dtype).itemsize
                tok_bytes, img_bytes = d_in * item, d_in * hw * hw * item
                raw_h5py(path)  # into the page cache
                t_h5 = min(raw_h5py(path) for _ in range(args.passes))
                t_mm = min(raw_memmap(path) for _ in range(args.passes))
                raw_tok = n * hw * hw / t_h5
                print(f"\nd_in {d_in}, {hw}x{hw} positions, {dtype}: {n} images, {path.stat().st_size / 2**20:.0f} MiB "
                      f"(HDF5 chunks of 16 images)")
                print(f"  {'reader':<34} {'tokens/s':>12} {'MB/s':>6} {'raw beside':>11} {'ratio':>6} {'build s':>8}")
                print(f"  {'raw h5py read_direct':<34} {raw_tok:>12,.0f} {n * img_bytes / t_h5 / 1e6:>6.0f}")
                print(f"  {'np.memmap copy':<34} {n * hw * hw / t_mm:>12,.0f} {n * img_bytes / t_mm / 1e6:>6.0f} "
                      f"{raw_tok:>11,.0f} {t_h5 / t_mm:>6.2f}")
                for f in path.parent.glob(path.name + ".tokens/*"):  # the first cache pass builds it: timed
                    f.unlink()
                for samples, cache in (("pooled", False), ("tokens", False), ("tokens", True)):
                    for w in args.workers:
                        b = args.batch if samples == "tokens" else max(1, min(args.batch, n // 16))
                        t_before = raw_h5py(path)
                        rate, _, t_setup = module_pass(path, samples, w, b, cache, args.passes)
                        near = n * hw * hw / min(t_before, raw_h5py(path))  # raw read measured right beside it
                        per = tok_bytes if samples == "tokens" else img_bytes
                        tok_rate = rate if samples == "tokens" else rate * hw * hw  # store tokens consumed
                        name = f"{samples}{' +token_cache' if cache else ' buffers' if samples == 'tokens' else ''}, {w} workers"
                        unit = "" if samples == "tokens" else " vec"
                        print(f"  module {name:<27} {rate:>12,.0f}{unit} {rate * per / 1e6:>{6 - len(unit)}.0f} "
                              f"{near:>11,.0f} {tok_rate / near:>6.2f}"
                              + (f" {t_setup:>8.2f}" if cache else ""))
                print(f"  load average now {os.getloadavg()[0]:.1f}")
                cache_dir = path.with_name(path.name + ".tokens")
                for f in cache_dir.glob("*"):
                    f.unlink()
                path.unlink()
        if args.rss:
            print("\nRSS growth during one training pass (fresh process, sampled after every batch; buffer 4 x 16 images,\n"
              "batch 1024 tokens / 16 pooled), d_in 64 16x16 float32:")
            for n in (512, 4096):
                path = make_store(Path(tmp) / f"rss{n}.h5", n, 64, 16, "float32")
                for samples, cache in (("tokens", False), ("tokens", True), ("pooled", False)):
                    out = subprocess.run([sys.executable, __file__, "--_rss", str(path), samples, str(int(cache))],
                                         check=True, capture_output=True, text=True).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    print(f"  {n:>5} images ({path.stat().st_size / 2**20:>4.0f} MiB) {samples:<6}"
                          f"{' +token_cache' if cache else '':<13} growth {r['growth'] / 2**20:6.1f} MiB "
                          f"(peak {r['peak'] / 2**20:.0f} MiB, {r['samples']} samples)")


if __name__ == "__main__":
    main()
