"""Probe speed: two design choices of the probes stage, each against its baseline in the same run.

1. ``LinearProbe`` fits small problems on one BLAS/OpenMP thread (``probes.linear.SMALL_PROBLEM``);
   baseline: the same CV path on the default thread count.
2. ``StreamingLinearProbe`` trains the whole L2 path as one bank of heads on one stream of the
   store; baseline: one single-head probe per L2 strength (L streams of the same data).

Run: ``python benchmarks/probe_speed.py`` (CPU; prints seconds and ratios).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import lightning  # noqa: F401  (imported up front so no timing includes it)
import numpy as np
from threadpoolctl import threadpool_info

import probes
from extraction.store import ActSpec, Batch, StoreWriter, create_store


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_threads() -> None:
    rng = np.random.default_rng(0)
    y = np.arange(200) % 5
    X = rng.standard_normal((200, 64)) + y[:, None] * 0.2
    probe = probes.LinearProbe(cv=5)
    one = timed(lambda: probe.fit(X, y))
    old = probes.linear.SMALL_PROBLEM
    probes.linear.SMALL_PROBLEM = 0  # every problem counts as large: default threads
    try:
        many = timed(lambda: probe.fit(X, y))
    finally:
        probes.linear.SMALL_PROBLEM = old
    threads = max((i["num_threads"] for i in threadpool_info()), default=1)
    print(f"LinearProbe 200x64, 7 Cs x 5 folds: one thread {one:.2f}s, default ({threads} threads) {many:.2f}s, "
          f"speed-up x{many / one:.1f}")


def bench_head_bank(tmp: Path) -> None:
    rng = np.random.default_rng(0)
    n, c = 512, 128
    y = np.arange(n) % 10
    x = rng.standard_normal((n, c, 4, 4)).astype(np.float32) + y[:, None, None, None] * 0.05
    path = tmp / "bench.h5"
    ids = [f"b{i}" for i in range(n)]
    create_store(path, source_index=list(range(n)), source_ids=ids, specs=[ActSpec("h", 1, x.shape[1:], "NCHW",
                 "output", (4, 4))], attrs={"model": "bench", "dataset": "bench", "config": "{}"}, batch_size=128)
    w = StoreWriter(path)
    w.write(Batch(np.arange(n), ids, y, [""] * n, {("h", 1): x}, np.zeros(0, np.int64)))
    w.finish()
    w.close()
    src = probes.StoreSource(path, "h", 1, np.arange(n), samples="tokens", chunk_images=128)
    wds = [1e-5, 1e-4, 1e-3, 1e-2]
    kw = dict(epochs=2, batch_size=512, threads=1)
    bank = timed(lambda: probes.StreamingLinearProbe(weight_decays=wds, **kw).fit(src, y), repeat=1)
    single = timed(lambda: [probes.StreamingLinearProbe(weight_decays=[wd], **kw).fit(src, y) for wd in wds],
                   repeat=1)
    print(f"StreamingLinearProbe, {n * 16} token samples x {c}, {len(wds)} L2 strengths: one bank {bank:.2f}s, "
          f"one probe per strength {single:.2f}s, speed-up x{single / bank:.1f}")


if __name__ == "__main__":
    bench_threads()
    with tempfile.TemporaryDirectory() as d:
        bench_head_bank(Path(d))
