"""The pre-shuffled token cache: the training tokens of one hook (at one or several timesteps) written once,
token-major and in a seeded random order, so that every training batch is read as a few contiguous runs.

Why: the buffer stream of ``sae/data.py`` reads chunks of images into a shuffle buffer and then gathers
each batch out of it (an ``index_select`` over the buffer), i.e. two passes over the bytes plus an NCHW
transpose; on one core that holds it to 0.1-0.4 of a raw sequential read. Here the shuffle is paid
once, when the cache is built, and a batch is ``runs_per_batch`` ``preadv`` calls straight from the page
cache (or the disk) into the batch tensor: one pass, no gather, no transpose, no mapped pages (resident
memory is the batch).

Files, next to the store (derived, deletable, rebuilt when the store or the split changes)::

    <store>.tokens/<hook>.<t label>.<key>.npy        (N, C) tokens, storage dtype, shuffled
    <store>.tokens/<hook>.<t label>.<key>.meta.npy   (N,) int64: store row * n_timesteps + timestep index
    <store>.tokens/<hook>.<t label>.<key>.json       what the cache holds (written last: its presence
                                                    marks a finished cache)

``key`` hashes the store's size / mtime, the training rows and the seed, so the cache never mixes in
validation images and another split gets its own file. The build is a two-pass external shuffle with
memory bounded by ``bucket_bytes`` (pass 1 deals each block of tokens to the buckets of their destinations,
pass 2 puts every bucket in order in memory), plus 8 bytes per token for the permutation.

The epoch stream: the N tokens are read as a circle starting at a seeded offset, cut into runs of
``L = batch_size / R`` tokens (R = ``runs_per_batch``, reduced to a divisor of the batch size); a seeded
permutation of the runs deals R runs to each batch, so batches differ from epoch to epoch while each stays
a set of contiguous reads. Batches are dealt to DDP ranks round-robin (disjoint, equal counts), and a
rank's batches to DataLoader workers round-robin, so the stream does not depend on the number of workers
and a resumed pass starts at the exact batch without reading what it skips.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from extraction.files import atomic_path, scratch_path, write_text_atomic
from torch.utils.data import IterableDataset, get_worker_info
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

FORMAT = 1

# Reader threads pay off only for batches of at least this many bytes: below it a batch is a few ``preadv``
# calls of tens of KiB, each shorter than the GIL hand-offs threads add, and reading in the training loop's
# own thread is faster (measured in benchmarks/sae_data.py: d_in 64 batches of 0.5-1 MiB read at 0.77-0.87 of
# raw h5py without threads, 0.40-0.55 with 2; d_in 1280 batches of 10-20 MiB at 1.2-1.5 without, 1.7-1.8 with).
THREAD_MIN_BATCH_BYTES = 2 << 20


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _t_label(timesteps: list[int]) -> str:
    return "t" + "-".join(str(int(t)) for t in timesteps)


def cache_paths(store: str | Path, hook: str, timesteps: list[int], train_rows: np.ndarray, seed: int
                ) -> tuple[Path, Path, Path]:
    """(tokens .npy, meta .npy, stamp .json) of the cache of these training rows of ``store``."""
    store = Path(store)
    s = store.stat()
    h = hashlib.sha1()
    h.update(json.dumps([FORMAT, s.st_size, s.st_mtime_ns, hook, [int(t) for t in timesteps], int(seed)]).encode())
    h.update(np.ascontiguousarray(train_rows, dtype=np.int64).tobytes())
    base = store.with_name(store.name + ".tokens") / f"{hook}.{_t_label(timesteps)}.{h.hexdigest()[:12]}"
    return (base.with_name(base.name + ".npy"), base.with_name(base.name + ".meta.npy"),
            base.with_name(base.name + ".json"))


def _npy_offset(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        if fortran:
            raise ValueError(f"{path} is not C-ordered")
        return tuple(shape), dtype, fh.tell()


def _valid(data: Path, meta: Path, stamp: Path) -> dict | None:
    try:
        info = json.loads(stamp.read_text())
        shape, dtype, _ = _npy_offset(data)
        mshape, _, _ = _npy_offset(meta)
        if list(shape) == [info["n"], info["C"]] and str(dtype) == info["dtype"] and list(mshape) == [info["n"]]:
            return info
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def build(store: str | Path, hook: str, timesteps: list[int], train_rows: np.ndarray, seed: int,
          bucket_bytes: int = 256 << 20, block_images: int = 64, progress: bool = True) -> tuple[Path, Path, dict]:
    """Write (once) the shuffled cache of ``train_rows`` of ``store`` at (hook, each timestep); returns its
    paths and description. Concurrent callers (DDP ranks on one node) wait for the first one's build."""
    from extraction.store import open_store

    from .data import _Source

    data, meta, stamp = cache_paths(store, hook, timesteps, train_rows, seed)
    data.parent.mkdir(parents=True, exist_ok=True)
    info = _valid(data, meta, stamp)
    if info is not None:
        return data, meta, info
    lock = os.open(data.parent / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = _valid(data, meta, stamp)
        if info is None:
            for old in data.parent.glob(f"{hook}.{_t_label(timesteps)}.*"):  # another split or an older store
                old.unlink(missing_ok=True)
            info = _build(open_store, _Source, store, hook, timesteps, np.asarray(train_rows), seed, data, meta,
                          stamp, bucket_bytes, block_images, progress)
    finally:
        os.close(lock)
    return data, meta, info


def _build(open_store, _Source, store, hook, timesteps, rows, seed, data, meta, stamp, bucket_bytes, block_images,
           progress) -> dict:
    nt, n_img = len(timesteps), len(rows)
    # the data and meta files are committed (fsync + rename) when the block ends, data first; the slot file is
    # scratch; an error removes all three and leaves the old files. The stamp, written last, marks a valid cache.
    with ExitStack() as files:
        meta_tmp = files.enter_context(atomic_path(meta, ext=".npy"))
        data_tmp = files.enter_context(atomic_path(data, ext=".npy"))
        slot_tmp = files.enter_context(scratch_path(data, ext=".npy"))
        with open_store(store) as st:
            srcs = [_Source(st, hook, int(t), "tokens") for t in timesteps]
            try:
                C, P, dtype = srcs[0].C, srcs[0].P, srcs[0].dtype
                N = nt * n_img * P
                # token i = (timestep index, image index, position) in that order; dest[i] = its place in the cache
                dest = _rng(seed, 17, N).permutation(N)
                S = max(1, min(N, bucket_bytes // (C * dtype.itemsize)))  # tokens per bucket
                K = -(-N // S)
                out = np.lib.format.open_memmap(data_tmp, mode="w+", dtype=dtype, shape=(N, C))
                slot = np.lib.format.open_memmap(slot_tmp, mode="w+", dtype=np.int64, shape=(N,))
                fill = np.arange(K, dtype=np.int64) * S  # next free slot of each bucket
                blocks = [(j, lo) for j in range(nt) for lo in range(0, n_img, block_images)]
                buf = np.empty(min(block_images, n_img) * P * C, dtype)
                quiet = not progress or len(blocks) < 8
                for j, lo in tqdm(blocks, desc=f"token cache {hook} (1/2: deal)", disable=quiet, leave=False):
                    hi = min(n_img, lo + block_images)
                    x = srcs[j].block(rows[lo:hi], out=buf)
                    d = dest[(j * n_img + lo) * P:(j * n_img + hi) * P]
                    b = d // S
                    order = np.argsort(b, kind="stable")
                    bs, starts, counts = np.unique(b[order], return_index=True, return_counts=True)
                    for k, s0, c in zip(bs, starts, counts):
                        sel = order[s0:s0 + c]
                        at = int(fill[k])
                        out[at:at + c] = x[sel]
                        slot[at:at + c] = d[sel]
                        fill[k] += c
                for k in tqdm(range(K), desc=f"token cache {hook} (2/2: order)", disable=quiet, leave=False):
                    lo, hi = k * S, min(N, (k + 1) * S)
                    chunk = np.array(out[lo:hi])
                    where = np.asarray(slot[lo:hi]) - lo
                    ordered = np.empty_like(chunk)
                    ordered[where] = chunk
                    out[lo:hi] = ordered
                out.flush()
                del out, slot
                key = np.empty(N, np.int64)  # store row * nt + timestep index of every cache slot
                tok_row = np.repeat(rows.astype(np.int64), P)
                for j in range(nt):
                    key[dest[j * n_img * P:(j + 1) * n_img * P]] = tok_row * nt + j
                np.save(meta_tmp, key)
            finally:
                for s in srcs:
                    s.close()
    info = {"format": FORMAT, "store": str(Path(store).resolve()), "hook": hook,
            "timesteps": [int(t) for t in timesteps], "seed": int(seed), "images": n_img, "positions": P,
            "n": int(N), "C": int(C), "dtype": str(dtype)}
    write_text_atomic(stamp, json.dumps(info))
    return info


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    if not shared:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(int(np.prod(shape)))
    return proto.new(storage).view(shape)


def run_length(batch_size: int, runs_per_batch: int) -> int:
    """Tokens per run: batch_size / R for the largest R <= runs_per_batch that divides the batch size."""
    r = max(1, min(runs_per_batch, batch_size))
    while batch_size % r:
        r -= 1
    return batch_size // r


class CacheStream(IterableDataset):
    """Training batches (activations (B, C), store rows (B,)[, timestep index (B,)]) read from a shuffled
    token cache as contiguous runs (see the module docstring).

    ``threads`` > 0: that many reader threads in this process read batches ahead (what ``data.num_workers``
    means on this path: worker processes would have to pass every batch through shared memory, which costs
    more than the read itself), for batches of at least ``THREAD_MIN_BATCH_BYTES``; smaller batches are read
    in the consuming thread, which is faster for them (``reader_threads`` says which). Inside a DataLoader
    worker the stream reads in that worker. The stream is the same either way.
    """

    def __init__(self, data: str | Path, meta: str | Path, info: dict, batch_size: int, runs_per_batch: int,
                 seed: int, with_t: bool, rank: int = 0, world: int = 1, threads: int = 0):
        self.data, self.meta = str(data), str(meta)
        self.N, self.C, self.nt = int(info["n"]), int(info["C"]), len(info["timesteps"])
        self.np_dtype = np.dtype(info["dtype"])
        self.dtype = torch.from_numpy(np.zeros(0, self.np_dtype)).dtype
        self.batch_size, self.seed, self.with_t = batch_size, seed, with_t
        self.L = run_length(batch_size, runs_per_batch)
        self.R = batch_size // self.L
        self.rank, self.world, self.threads = rank, world, threads
        self.epoch, self.start = 0, 0
        self.row_bytes = self.C * self.np_dtype.itemsize
        self._offsets = (_npy_offset(Path(data))[2], _npy_offset(Path(meta))[2])

    @property
    def reader_threads(self) -> int:
        """The reader threads this stream uses: ``threads``, or 0 for batches under ``THREAD_MIN_BATCH_BYTES``."""
        return self.threads if self.batch_size * self.row_bytes >= THREAD_MIN_BATCH_BYTES else 0

    def batches_per_shard(self, epoch: int, n_shards: int) -> int:
        """Batches each DDP rank yields per epoch (``n_shards``: the world size; workers share a rank's)."""
        return (self.N // self.batch_size) // max(1, n_shards)

    def plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """(circle offset, run order) of ``epoch``: global batch b reads runs order[b*R:(b+1)*R]."""
        n_runs = (self.N // self.batch_size) * self.R
        return int(_rng(self.seed, epoch, 3).integers(self.N)), _rng(self.seed, epoch, 5).permutation(n_runs)

    def rank_batches(self, epoch: int) -> np.ndarray:
        """The global batch indices this rank yields in ``epoch``, in order."""
        m = self.batches_per_shard(epoch, self.world)
        return self.rank + self.world * np.arange(m)

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        offset, order = self.plan(self.epoch)
        mine = self.rank_batches(self.epoch)[self.start + wid::workers]
        fds = os.open(self.data, os.O_RDONLY), os.open(self.meta, os.O_RDONLY)
        shared = info is not None
        try:
            threads = self.reader_threads
            if threads <= 0 or shared:
                for b in mine:
                    yield self._batch(fds, offset, order[b * self.R:(b + 1) * self.R], shared)
                return
            # reader threads (preadv releases the GIL): batches are read ahead in order, in tasks of about 4 MiB
            # (small batches one at a time would cost more in hand-offs than in reading). The batch tensors are
            # allocated here, in the consuming thread that also frees them: allocated in a reader thread, each
            # batch would come from that thread's malloc arena and be unmapped when freed, and every batch would
            # then pay its page faults again.
            per = max(1, -(-(4 << 20) // (self.batch_size * self.row_bytes)))
            tasks = [mine[i:i + per] for i in range(0, len(mine), per)]
            with ThreadPoolExecutor(threads, thread_name_prefix="token-cache") as pool:
                ahead: deque = deque()
                try:
                    for group in tasks:
                        bufs = [self._alloc_batch(False) for _ in group]
                        ahead.append((pool.submit(self._fill_group, fds, offset, order, group, bufs), bufs))
                        if len(ahead) >= 2 * threads:
                            fut, done = ahead.popleft()
                            fut.result()
                            yield from (self._finish(*b) for b in done)
                    while ahead:
                        fut, done = ahead.popleft()
                        fut.result()
                        yield from (self._finish(*b) for b in done)
                finally:
                    for f, _ in ahead:
                        f.cancel()
                    wait([f for f, _ in ahead])
        finally:
            for fd in fds:
                os.close(fd)

    def _read(self, fd: int, base: int, item: int, dst: memoryview, first: int) -> None:
        """dst (bytes of whole rows) = cache rows first, first+1, ... (circular): one ``preadv`` per contiguous
        piece, short reads (a signal, a truncated file) finished or failed loudly."""
        n, at = len(dst) // item, 0
        while at < n:
            lo = (first + at) % self.N
            k = min(n - at, self.N - lo)
            view = dst[at * item:(at + k) * item]
            got = os.preadv(fd, [view], base + lo * item)
            while got < len(view):
                more = os.preadv(fd, [view[got:]], base + lo * item + got)
                if more <= 0:
                    raise OSError(f"token cache {self.data}: short read at row {lo}")
                got += more
            at += k

    def _alloc_batch(self, shared: bool) -> tuple[torch.Tensor, np.ndarray]:
        return _alloc((self.batch_size, self.C), self.dtype, shared), np.empty(self.batch_size, np.int64)

    def _fill(self, fds, offset: int, runs: np.ndarray, x: torch.Tensor, key: np.ndarray) -> None:
        """Read the R runs of one batch into (x, key)."""
        L, row = self.L, self.row_bytes
        xb, kb = memoryview(x.numpy()).cast("B"), memoryview(key).cast("B")
        (bx, bk), N = self._offsets, self.N
        for j, run in enumerate(runs):
            first = (offset + int(run) * L) % N
            dx, dk = xb[j * L * row:(j + 1) * L * row], kb[j * L * 8:(j + 1) * L * 8]
            if first + L <= N:  # the common case: one read each, no wrap
                if os.preadv(fds[0], [dx], bx + first * row) == len(dx) and \
                        os.preadv(fds[1], [dk], bk + first * 8) == len(dk):
                    continue
            self._read(fds[0], bx, row, dx, first)
            self._read(fds[1], bk, 8, dk, first)

    def _fill_group(self, fds, offset: int, order: np.ndarray, group: np.ndarray, bufs: list) -> None:
        for b, (x, key) in zip(group, bufs):
            self._fill(fds, offset, order[b * self.R:(b + 1) * self.R], x, key)

    def _finish(self, x: torch.Tensor, key: np.ndarray) -> tuple:
        if not self.with_t:
            return x, torch.from_numpy(key)
        return x, torch.from_numpy(key // self.nt), torch.from_numpy(key % self.nt)

    def _batch(self, fds, offset: int, runs: np.ndarray, shared: bool) -> tuple:
        x, key = self._alloc_batch(shared)
        self._fill(fds, offset, runs, x, key)
        return self._finish(x, key)
