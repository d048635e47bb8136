"""Streaming activations of one hook at one or several timesteps out of an activation store, with bounded memory.

Samples are either one pooled vector per image or every spatial position / DiT token of an
image. The train / validation split is by image.

Training tokens are read by default from the pre-shuffled token cache (``sae/token_cache.py``): written
once next to the store, a batch is then a few contiguous reads. What follows is the stream used for
pooled samples, for validation and with ``token_cache=False`` (no extra disk): the training images are cut into
chunks of ``chunk_images`` consecutive rows; each epoch visits the chunks in a seeded random
order, ``buffer_chunks`` at a time (the shuffle buffer), and shuffles the samples inside the
buffer; batches are gathered from it with one ``index_select``. At most two buffers (one being
drained by less than one batch) are ever in memory; they are reused, not reallocated.

The stream is a pure function of (seed, epoch, position), so a resumed run skips to the exact
batch it stopped at without reading what it skips. Groups of chunks are dealt to (rank,
worker) shards; every shard yields the same number of batches per epoch, so DataLoader
workers interleave in a fixed round-robin and DDP ranks step in lockstep.

Several timesteps (``timestep`` a list): the samples of every timestep are pooled. Each timestep's
training images are cut into the same chunks, and the chunks of all timesteps are shuffled together,
so a shuffle buffer holds chunks of random timesteps and its samples are shuffled across them; the
batch is then (activations, rows, timestep index), the index into the list of timesteps.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from extraction.store import open_store
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from . import token_cache as _tc
from .token_cache import _alloc, _rng

log = logging.getLogger(__name__)

SampleMode = Literal["pooled", "tokens"]
SAMPLE_MODES = ("pooled", "tokens")
NONFINITE_POLICIES = ("fail", "skip")


def read_samples(st, hook: str, t: int, rows: np.ndarray, samples: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_samples, C) float32 activations of ``rows`` and the store row of each sample."""
    if samples == "pooled":
        return st.pooled(hook, t, rows), np.asarray(rows)
    return st.tokens(hook, t, rows)


def _map_dataset(path: str, ds) -> tuple[list[tuple[int, int, int]], mmap.mmap] | None:
    """Memory-map an uncompressed, non-virtual dataset stored as whole rows (a contiguous layout, or chunks
    of whole rows, as ``create_store`` writes them): the segments of back-to-back rows as (first row, end
    row, byte offset) and the file mapping; None when the bytes are not laid out that way (the caller then
    reads through h5py). HDF5 puts metadata between chunks now and then, hence several segments."""
    try:
        if ds.is_virtual or ds.dtype.byteorder == ">" or ds.shape[0] == 0 or ds.id.get_create_plist().get_nfilters():
            return None
        n = ds.shape[0]
        row_bytes = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
        base = ds.id.get_offset()
        if base is not None:
            segments = [(0, n, int(base))]
        else:
            if ds.chunks is None or tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
                return None
            info: list[tuple[int, int, int]] = []
            ds.id.chunk_iter(lambda c: info.append((c.chunk_offset[0], c.byte_offset, c.size)))
            info.sort()
            segments, rows = [], 0
            for r0, off, size in info:
                if r0 != rows or size != ds.chunks[0] * row_bytes:
                    return None
                r1 = min(n, r0 + ds.chunks[0])
                if segments and segments[-1][2] + (r0 - segments[-1][0]) * row_bytes == off:
                    segments[-1] = (segments[-1][0], r1, segments[-1][2])
                else:
                    segments.append((r0, r1, int(off)))
                rows = r0 + ds.chunks[0]
            if rows < n:
                return None
        if max(off + (r1 - r0) * row_bytes for r0, r1, off in segments) > os.path.getsize(path):
            return None
        with open(path, "rb") as fh:  # private mapping: writable numpy views, pages read from the page cache
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return segments, mm
    except (AttributeError, OSError, ValueError, RuntimeError):  # an h5py without chunk queries, odd files
        return None


def _transpose(src: np.ndarray, dst: np.ndarray, tile: int = 32) -> None:
    """dst (n, P, C) = src (n, C, P) transposed per image, in channel tiles that stay in the L1 cache
    (2-4x faster than one strided copy at C = 1280)."""
    C = src.shape[1]
    for c in range(0, C, tile):
        np.copyto(dst[:, :, c:c + tile], src[:, c:c + tile, :].transpose(0, 2, 1))


class _Source:
    """Blocks of one (hook, t) array, read as whole row ranges: samples in rows, storage dtype for tokens.

    Fast path: the dataset's chunks are located in the file (``_map_dataset``). Token-major rows (NTC,
    NC layouts, or the token cache of an NCHW array) are read with one ``preadv`` per run of consecutive
    rows straight into the reused shuffle buffer; NCHW rows are transposed out of a memory-mapped view
    (its pages dropped again after each buffer). Virtual, compressed or otherwise laid-out datasets are
    read with ``read_direct`` per run of rows.
    """

    def __init__(self, st, hook: str, t: int, samples: str):
        self.path = str(st.path)
        self.ds = st._ds(hook, t)
        self.layout, self.samples = st.layout(hook, t), samples
        shape = self.ds.shape
        self.C = int(shape[1] if self.layout in ("NCHW", "NC") else shape[2])
        self.P = 1 if samples == "pooled" or self.layout == "NC" else int(np.prod(shape[2:]) if self.layout == "NCHW"
                                                                            else shape[1])
        self.dtype = np.dtype(np.float32) if samples == "pooled" else self.ds.dtype
        # segments of back-to-back rows in the mapping: first rows, views (rows, ...) and byte offsets
        self._mm, self.seg_rows, self.views, self.offsets = None, None, [], []
        self.token_major = samples == "tokens" and self.layout in ("NTC", "NC")  # rows are (positions, C) already
        self._fd: int | None = None  # token-major bytes are read with preadv into the buffer (no page faults)
        self.row_bytes = int(np.prod(shape[1:])) * self.ds.dtype.itemsize
        m = _map_dataset(self.path, self.ds)
        if m is not None:
            segments, self._mm = m
            self.seg_rows = np.array([r0 for r0, _, _ in segments])
            self.offsets = [off for _, _, off in segments]
            self.views = [np.frombuffer(self._mm, self.ds.dtype, count=(r1 - r0) * int(np.prod(shape[1:])),
                                        offset=off).reshape(r1 - r0, *shape[1:]) for r0, r1, off in segments]
            if self.token_major:
                self._fd = os.open(self.path, os.O_RDONLY)

    def _runs(self, rows: np.ndarray):
        """(start, stop, position in ``rows``) of each run of consecutive store rows."""
        cut = np.flatnonzero(np.diff(rows) != 1) + 1
        for s, e in zip(np.r_[0, cut], np.r_[cut, len(rows)]):
            yield int(rows[s]), int(rows[e - 1]) + 1, int(s)

    def raw(self, lo: int, hi: int) -> np.ndarray:
        """Stored rows lo..hi-1 in the stored layout and dtype: a view of the mapping, or one hyperslab read."""
        if self.views:
            k = int(np.searchsorted(self.seg_rows, lo, side="right")) - 1
            r0 = int(self.seg_rows[k])
            v = self.views[k]
            if hi - r0 <= len(v):
                return v[lo - r0:hi - r0]
            return np.concatenate([v[lo - r0:], self.raw(r0 + len(v), hi)])  # a run across a gap: rare
        out = np.empty((hi - lo, *self.ds.shape[1:]), self.ds.dtype)
        self.ds.read_direct(out, np.s_[lo:hi], np.s_[0:hi - lo])
        return out

    def block(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(len(rows) * P, C) samples of increasing ``rows``, image-major: float32 means (pooled) or stored
        tokens; written into the front of ``out`` (a flat buffer of this dtype, reused) when given."""
        n, P, C = len(rows), self.P, self.C
        out = np.empty((n, P, C), self.dtype) if out is None else out[:n * P * C].reshape(n, P, C)
        for lo, hi, at in self._runs(rows):
            k = hi - lo
            dst = out[at:at + k]
            if self._fd is not None and self.token_major:
                seg = int(np.searchsorted(self.seg_rows, lo, side="right")) - 1
                r0 = int(self.seg_rows[seg])
                if hi - r0 <= len(self.views[seg]):  # one read straight from the page cache into the buffer
                    at_byte = self.offsets[seg] + (lo - r0) * self.row_bytes
                    got = os.preadv(self._fd, [memoryview(dst).cast("B")], at_byte)
                    if got == dst.nbytes:
                        continue
            x = self.raw(lo, hi)
            if self.samples == "pooled":
                t = torch.from_numpy(np.ascontiguousarray(x))
                if self.layout != "NC":
                    t = t.reshape(k, C, -1).mean(2, dtype=torch.float32) if self.layout == "NCHW" \
                        else t.mean(1, dtype=torch.float32)
                dst[:, 0] = t.numpy()
            elif self.layout == "NCHW":  # the one transpose tokens need: (C, H*W) -> (H*W, C) per image
                _transpose(x.reshape(k, C, P), dst)
            else:
                dst[...] = x.reshape(k, P, C)
        return out.reshape(n * P, C)

    def _ranges(self, chunks: list[np.ndarray], grain: int):
        """Byte ranges of the mapping that hold these row chunks, widened to ``grain`` boundaries."""
        for rows in chunks:
            if not len(rows):
                continue
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            k0 = int(np.searchsorted(self.seg_rows, lo, side="right")) - 1
            k1 = int(np.searchsorted(self.seg_rows, hi - 1, side="right")) - 1
            for k in range(k0, k1 + 1):
                r0 = int(self.seg_rows[k])
                r1 = int(self.seg_rows[k + 1]) if k + 1 < len(self.seg_rows) else hi
                a = self.offsets[k] + (max(lo, r0) - r0) * self.row_bytes
                end = self.offsets[k] + (min(hi, r1) - r0) * self.row_bytes
                a -= a % grain
                yield a, min(-(-end // grain) * grain, len(self._mm)) - a

    def release(self, chunks: list[np.ndarray]) -> None:
        """Drop the mapped pages of these row chunks from this process (they stay in the page cache), so
        resident memory stays about two shuffle buffers whatever the store's size."""
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        # widened to 2 MiB boundaries: a read fault maps the pages around it too (fault-around, large folios)
        for a, n in self._ranges(chunks, max(mmap.PAGESIZE, 1 << 21)):
            self._mm.madvise(mmap.MADV_DONTNEED, a, n)

    def close(self) -> None:
        self.views = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a batch still points into the mapping; it goes when that does
                pass
            self._mm = None


class _Stream(IterableDataset):
    """Batches of (activations (B, C), store rows (B,)) from ``chunks`` of image rows.

    Activations are float32 for pooled samples and the store's dtype (float16 or float32) for tokens;
    the model casts on its device. ``shuffle``: the training stream described in the module docstring;
    otherwise chunks are read in order (validation) and the last batch may be short.
    """

    def __init__(self, path: str, hook: str, t: int | list[int], samples: str, chunks: list[np.ndarray],
                 per_image: int, batch_size: int, buffer_chunks: int, shuffle: bool, seed: int, rank: int = 0,
                 world: int = 1, chunk_t: list[int] | None = None):
        self.path, self.hook, self.samples = path, hook, samples
        # several timesteps: ``chunk_t[c]`` is the timestep index of chunk c and batches carry the index
        self.with_t = isinstance(t, (list, tuple))
        self.ts = [int(v) for v in t] if self.with_t else [int(t)]
        self.t = self.ts[0]
        self.chunk_t = list(chunk_t) if chunk_t is not None else [0] * len(chunks)
        self.chunks, self.per_image, self.batch_size = chunks, per_image, batch_size
        self.buffer_chunks, self.shuffle, self.seed = buffer_chunks, shuffle, seed
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0  # start: batches of this epoch already consumed (per rank)

    def groups(self, epoch: int) -> list[list[int]]:
        """This epoch's shuffle buffers: lists of chunk indices."""
        order = _rng(self.seed, epoch).permutation(len(self.chunks)) if self.shuffle else np.arange(len(self.chunks))
        return [list(order[i:i + self.buffer_chunks]) for i in range(0, len(order), self.buffer_chunks)]

    def _group_size(self, group: list[int]) -> int:
        return sum(len(self.chunks[c]) for c in group) * self.per_image

    def batches_per_shard(self, epoch: int, n_shards: int) -> int:
        """Training batches every shard yields in ``epoch`` (the minimum over shards, so all are equal)."""
        groups = self.groups(epoch)
        sizes = [sum(self._group_size(g) for g in groups[s::n_shards]) for s in range(n_shards)]
        return min(sizes) // self.batch_size

    def shard_groups(self, epoch: int, shard: int, n_shards: int) -> list[list[int]]:
        """The shuffle buffers (rank x worker) shard ``shard`` reads in ``epoch``: disjoint between shards."""
        return self.groups(epoch)[shard::n_shards]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        # DataLoader asks workers 0, 1, ... in turn; a pass resumed after `start` batches must begin with the
        # worker that owns batch `start`, so worker `wid` plays logical worker (wid + start) % workers.
        wid = (wid + self.start) % workers
        n_shards, shard = self.world * workers, self.rank * workers + wid
        groups = self.shard_groups(self.epoch, shard, n_shards)
        with open_store(self.path) as st:
            used = sorted({self.chunk_t[c] for g in groups for c in g})
            srcs = {}
            try:
                for i in used:
                    srcs[i] = _Source(st, self.hook, self.ts[i], self.samples)
                if not self.shuffle:
                    for g in groups:
                        x, rows, tix = self._read_group(srcs, g)
                        P = next(iter(srcs.values())).P
                        r, ti = torch.from_numpy(np.repeat(rows, P)), torch.from_numpy(np.repeat(tix, P))
                        for i in range(0, len(x), self.batch_size):
                            sl = slice(i, i + self.batch_size)
                            yield ((x[sl].clone(), r[sl].clone(), ti[sl].clone()) if self.with_t
                                   else (x[sl].clone(), r[sl].clone()))
                    return
                total = self.batches_per_shard(self.epoch, n_shards)
                done = (self.start - wid + workers - 1) // workers if self.start > wid else 0  # round-robin share
                yield from self._shuffled(srcs, groups, total, done, shared=info is not None)
            finally:
                for src in srcs.values():
                    src.close()

    def _read_group(self, srcs: dict[int, _Source], g: list[int], out: np.ndarray | None = None
                    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The samples of the chunks ``g`` as one (n, C) matrix (in the front of ``out`` when given): timestep
        by timestep (increasing index), each timestep's rows increasing; with the store row and timestep
        index of each image block."""
        by_t: dict[int, list[np.ndarray]] = {}
        for c in g:
            by_t.setdefault(self.chunk_t[c], []).append(self.chunks[c])
        src0 = srcs[min(by_t)]
        C, P = src0.C, src0.P
        if out is None:
            out = np.empty(self._group_size(g) * C, src0.dtype)
        at, rows_parts, t_parts = 0, [], []
        for i in sorted(by_t):
            rows = np.sort(np.concatenate(by_t[i]))
            srcs[i].block(rows, out=out[at * C:])
            at += len(rows) * P
            rows_parts.append(rows)
            t_parts.append(np.full(len(rows), i, np.int64))
        return torch.from_numpy(out[:at * C].reshape(at, C)), np.concatenate(rows_parts), np.concatenate(t_parts)

    def _shuffled(self, srcs: dict[int, _Source], groups: list[list[int]], total: int, done: int, shared: bool):
        """The shuffled batches of one shard: each buffer's samples in a seeded permutation, gathered
        batch by batch (one ``index_select`` per buffer a batch draws from)."""
        src = next(iter(srcs.values()))
        B, P = self.batch_size, src.P
        tdtype = torch.from_numpy(np.zeros(0, src.dtype)).dtype
        skip = done * B  # samples of this shard's stream already consumed
        emitted = done
        pending: list[tuple] = []  # (buffer matrix, sample ids, rows, timestep indices of the buffer): < one batch
        buffers: list[np.ndarray] = []
        have = 0
        prev = None
        for g in groups:
            if emitted >= total:
                break
            size = self._group_size(g)
            if skip >= size:
                skip -= size
                continue
            perm = _rng(self.seed, self.epoch, 1 + min(g)).permutation(size)[skip:]
            skip = 0
            # a buffer no pending sample points into: at most two are ever allocated (fresh memory would
            # page-fault on every buffer)
            busy = {part[0].data_ptr() for part in pending}
            free = [b for b in buffers if b.ctypes.data not in busy and b.size >= size * src.C]
            if not free:
                buffers = [b for b in buffers if b.ctypes.data in busy] + [np.empty(size * src.C, src.dtype)]
                free = buffers[-1:]
            matrix, rows, tix = self._read_group(srcs, g, out=free[0])
            ids = perm
            i = 0
            while i < len(ids) and emitted < total:
                take = min(B - have, len(ids) - i)
                pending.append((matrix, ids[i:i + take], rows, tix))
                have += take
                i += take
                if have == B:
                    yield self._gather(pending, B, src.C, tdtype, shared, P, self.with_t)
                    emitted += 1
                    pending, have = [], 0
            if prev is not None:
                self._release(srcs, prev)
            prev = g
        if prev is not None:
            self._release(srcs, prev)

    def _release(self, srcs: dict[int, _Source], g: list[int]) -> None:
        for i, src in srcs.items():
            src.release([self.chunks[c] for c in g if self.chunk_t[c] == i])

    @staticmethod
    def _gather(parts, B: int, C: int, dtype: torch.dtype, shared: bool, P: int, with_t: bool = False) -> tuple:
        """One batch from its parts (buffer matrix, sample ids, store rows and timestep indices of the buffer's
        image blocks): ids sorted, so each gather sweeps forward through memory; rows and timestep indices
        follow from the ids. (x, rows), or (x, rows, timestep index) with several timesteps."""
        x = _alloc((B, C), dtype, shared)
        r = np.empty(B, np.int64)
        ti = np.empty(B, np.int64)
        o = 0
        for matrix, ids, buf_rows, buf_t in parts:
            ids = np.sort(ids)
            n = len(ids)
            torch.index_select(matrix, 0, torch.from_numpy(ids), out=x[o:o + n])  # ids: block * P + position
            r[o:o + n] = buf_rows[ids // P]
            ti[o:o + n] = buf_t[ids // P]
            o += n
        return (x, torch.from_numpy(r), torch.from_numpy(ti)) if with_t else (x, torch.from_numpy(r))


class _EpochLoader(DataLoader):
    """A DataLoader that tells its stream the epoch and resume position before each pass."""

    def __init__(self, dataset: _Stream, position, **kw):
        super().__init__(dataset, batch_size=None, **kw)
        self._position = position

    def __iter__(self):
        self.dataset.epoch, self.dataset.start = self._position(self.dataset)
        return super().__iter__()


class StoreDataModule(L.LightningDataModule):
    """Activations of ``hook`` at ``timestep`` (one, or a list pooled together) from an activation store, split
    by image.

    Args:
        store: path of the activation store (HDF5).
        hook, timestep: which array to train on; a list of timesteps pools their samples, and batches are
            then (activations, rows, timestep index) with the index into ``timesteps`` (the split is by image,
            the same images at every timestep; an image with NaN/inf at any timestep is dropped at all).
        samples: "pooled" (one vector per image) or "tokens" (every position / token a sample).
        batch_size: samples per batch and device.
        val_fraction: share of images held out for validation (never split across train/val).
        chunk_images: images per read chunk; buffer_chunks: chunks per shuffle buffer.
        num_workers: DataLoader worker processes; pin_memory: None = when a GPU is used.
        check_finite: scan the split once for NaN/inf; nonfinite: "fail" (error naming the image ids) or "skip".
        seed: split and shuffle seed.
        token_cache: tokens only: write once a token-major copy of the training tokens in a seeded random order
            next to the store (``sae/token_cache.py``) and read each training batch from it as
            ``runs_per_batch`` contiguous runs (the fast path; costs the training part of the array in disk
            space). False: the shuffle-buffer stream straight from the store (no extra disk). Pooled
            samples and validation always read the store.
        runs_per_batch: contiguous runs per batch on the token cache (more: batches vary more between epochs).
    """

    def __init__(self, store: str, hook: str, timestep: int | list[int], samples: SampleMode = "pooled",
                 batch_size: int = 4096,
                 val_fraction: float = 0.1, chunk_images: int = 64, buffer_chunks: int = 16, num_workers: int = 0,
                 pin_memory: bool | None = None, check_finite: bool = True,
                 nonfinite: Literal["fail", "skip"] = "fail", seed: int = 0, token_cache: bool = True,
                 runs_per_batch: int = 8):
        super().__init__()
        if samples not in SAMPLE_MODES:
            raise ValueError(f"samples {samples!r} is not one of {list(SAMPLE_MODES)}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite {nonfinite!r} is not one of {list(NONFINITE_POLICIES)}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.with_t = isinstance(timestep, (list, tuple))
        self.timesteps = [int(t) for t in timestep] if self.with_t else [int(timestep)]
        if not self.timesteps:
            raise ValueError("timesteps is empty: name at least one timestep")
        if len(set(self.timesteps)) != len(self.timesteps):
            raise ValueError(f"timesteps {self.timesteps} name a timestep twice")
        self.store, self.hook, self.samples = str(store), hook, samples
        self.timestep = self.timesteps[0]  # the (first) timestep: what single-timestep code reads
        self.batch_size, self.val_fraction = batch_size, val_fraction
        self.chunk_images, self.buffer_chunks = chunk_images, buffer_chunks
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.check_finite, self.nonfinite, self.seed = check_finite, nonfinite, seed
        if runs_per_batch < 1:
            raise ValueError(f"runs_per_batch must be >= 1, got {runs_per_batch}")
        self.token_cache, self.runs_per_batch = token_cache, runs_per_batch
        self._cache: tuple | None = None  # (tokens path, meta path, description) of the shuffled token cache
        self._resume: tuple[int, int] | None = None
        self.position = [0, 0]  # [epoch, batches consumed in it]
        self._epoch_counter = -1
        self._ready = False

    # ---- index ----------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Open the store, check the (hook, timestep), scan for non-finite values and split by image."""
        if self._ready:
            return
        if not Path(self.store).exists():
            raise FileNotFoundError(f"activation store {self.store!r} does not exist")
        with open_store(self.store) as st:
            if self.hook not in st.hooks:
                raise KeyError(f"hook {self.hook!r} is not in {self.store}; it has (hook: timesteps) "
                               + "; ".join(f"{h}: {st.timesteps(h)}" for h in st.hooks))
            for t in self.timesteps:
                if t not in st.timesteps(self.hook):
                    raise KeyError(f"timestep {t} of hook {self.hook!r} is not in {self.store}; "
                                   f"it has timesteps {st.timesteps(self.hook)}")
            self.d_in = st.d_in(self.hook, self.timestep)
            self.layout = st.layout(self.hook, self.timestep)
            for t in self.timesteps[1:]:
                ds0, ds = st._ds(self.hook, self.timestep), st._ds(self.hook, t)
                if (st.layout(self.hook, t), ds.shape, ds.dtype) != (self.layout, ds0.shape, ds0.dtype):
                    raise ValueError(f"{self.store}: {self.hook} t={t} has layout {st.layout(self.hook, t)} shape "
                                     f"{ds.shape} {ds.dtype}, t={self.timestep} has {self.layout} {ds0.shape} "
                                     f"{ds0.dtype}; timesteps pooled together must have the same shape")
            self.ids = st.ids
            rows = np.flatnonzero(st.done)
            if len(rows) == 0:
                raise ValueError(f"{self.store} has no finished rows")
            self.per_image = 1 if self.samples == "pooled" else len(read_samples(
                st, self.hook, self.timestep, rows[:1], "tokens")[0])
            if self.check_finite:
                rows = self._drop_nonfinite(st, rows)
        perm = _rng(self.seed, 7).permutation(len(rows))
        n_val = int(round(self.val_fraction * len(rows))) if self.val_fraction > 0 else 0
        if self.val_fraction > 0 and len(rows) > 1:
            n_val = min(max(n_val, 1), len(rows) - 1)
        self.val_rows = np.sort(rows[perm[:n_val]])
        self.train_rows = np.sort(rows[perm[n_val:]])
        if self.token_cache and self.samples == "tokens":
            try:
                self._cache = _tc.build(self.store, self.hook, self.timesteps, self.train_rows, self.seed)
            except OSError as e:  # a read-only folder, a full disk: the buffer stream needs no extra files
                log.warning("cannot write the token cache next to %s (%s); reading batches from the store's "
                            "shuffle buffers instead", self.store, e)
                self._cache = None
        self._ready = True

    @property
    def t_label(self) -> str:
        """``t=25``, or ``t in [25, 250]`` for several timesteps (for messages)."""
        return f"t={self.timestep}" if not self.with_t else f"t in {self.timesteps}"

    def nonfinite_rows(self, rows: np.ndarray, st=None) -> list[int]:
        """The store rows among ``rows`` whose activations at (hook, any of the timesteps) hold NaN/inf (one scan)."""
        if st is None:
            with open_store(self.store) as st:
                return self.nonfinite_rows(rows, st)
        bad: set[int] = set()
        for t in self.timesteps:
            it = st.iter_batches(self.hook, t, self.chunk_images, rows)
            for r, x in tqdm(it, total=math.ceil(len(rows) / self.chunk_images), desc="scan for NaN/inf", leave=False,
                             disable=len(rows) <= 4 * self.chunk_images):
                ok = np.isfinite(x.reshape(len(r), -1)).all(axis=1)
                bad.update(r[~ok].tolist())
        return sorted(bad)

    def _drop_nonfinite(self, st, rows: np.ndarray) -> np.ndarray:
        bad = self.nonfinite_rows(rows, st)
        if not bad:
            return rows
        ids = [str(self.ids[b]) for b in bad]
        shown = ", ".join(ids[:20]) + (f" ... ({len(ids)} in all)" if len(ids) > 20 else "")
        if self.nonfinite == "fail":
            raise ValueError(f"{len(ids)} image(s) of {self.store} have NaN/inf activations at {self.hook} "
                             f"{self.t_label}: {shown}; set data.nonfinite skip to train without them")
        log.warning("skipping %d image(s) with NaN/inf activations: %s", len(ids), shown)
        self.skipped_ids = ids
        return np.setdiff1d(rows, np.asarray(bad))

    def _chunks(self, rows: np.ndarray) -> list[np.ndarray]:
        """Chunks of ``rows``; with several timesteps, those of every timestep in turn (see ``_chunk_t``)."""
        one = [rows[i:i + self.chunk_images] for i in range(0, len(rows), self.chunk_images)]
        return one * len(self.timesteps)

    def _chunk_t(self, rows: np.ndarray) -> list[int]:
        """The timestep index of each chunk of ``_chunks(rows)``."""
        n = -(-len(rows) // self.chunk_images)
        return [i for i in range(len(self.timesteps)) for _ in range(n)]

    def _dist(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # DDP outside Lightning
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # ---- loaders --------------------------------------------------------------------------------------------
    def loader(self, rows: np.ndarray, shuffle: bool) -> DataLoader:
        """Batches of (activations, rows[, timestep index]) over ``rows``: the shuffled training stream, or in
        order (timestep by timestep)."""
        rank, world = self._dist()
        if shuffle and self._cache is not None and np.array_equal(rows, self.train_rows):
            ds = _tc.CacheStream(*self._cache, batch_size=self.batch_size, runs_per_batch=self.runs_per_batch,
                                 seed=self.seed, with_t=self.with_t, rank=rank, world=world,
                                 threads=self.num_workers)
        else:
            ds = _Stream(self.store, self.hook, self.timesteps if self.with_t else self.timestep, self.samples,
                         self._chunks(rows), self.per_image, self.batch_size, self.buffer_chunks, shuffle, self.seed,
                         rank, world, self._chunk_t(rows))
        pin = self.pin_memory
        if pin is None:  # pin only when batches go to a GPU
            pin = (self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator" if self.trainer is not None
                   else torch.cuda.is_available())
        # the token cache reads with threads in this process (CacheStream.threads), not worker processes
        kw = dict(num_workers=0 if isinstance(ds, _tc.CacheStream) else self.num_workers, pin_memory=pin)
        if shuffle:
            return _EpochLoader(ds, self._next_position, **kw)
        return DataLoader(ds, batch_size=None, **kw)

    def train_dataloader(self) -> DataLoader:
        if len(self.train_rows) * self.per_image * len(self.timesteps) < self.batch_size:
            raise ValueError(f"{len(self.train_rows)} training images x {self.per_image} samples each is less than one "
                             f"batch ({self.batch_size}); lower data.batch_size or use data.samples tokens")
        loader = self.loader(self.train_rows, shuffle=True)
        if isinstance(loader.dataset, _tc.CacheStream):
            if loader.dataset.batches_per_shard(0, loader.dataset.world) == 0:
                raise ValueError(f"{loader.dataset.N} training tokens make no full batch of {self.batch_size} on each of "
                                 f"{loader.dataset.world} ranks; lower data.batch_size")
            return loader
        shards = loader.dataset.world * max(1, self.num_workers)
        if loader.dataset.batches_per_shard(0, shards) == 0:
            raise ValueError(f"{len(self.train_rows)} training images in chunks of {self.chunk_images}, "
                             f"{self.buffer_chunks} chunks per buffer, leave some of the {shards} (rank x worker) shards "
                             "without a full batch; lower data.chunk_images, data.buffer_chunks, data.num_workers "
                             "or data.batch_size")
        return loader

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_rows, shuffle=False)

    def _next_position(self, ds=None) -> tuple[int, int]:
        """(epoch, batches already consumed) for the pass that is starting.

        The data epoch is this module's own count of passes (restored from a checkpoint), not the trainer's
        epoch: resumed from a checkpoint taken on the last batch of an epoch, Lightning (which cannot know
        the length of an iterable stream) first finishes that epoch with an empty pass and then counts one
        epoch more than the uninterrupted run; the data stream must go on with the next epoch either way."""
        epoch, start = self._epoch_counter + 1, 0
        if self._resume is not None:
            epoch, start = self._resume
            if ds is not None and start >= self._batches_per_rank(ds, epoch):  # that epoch was finished
                epoch, start = epoch + 1, 0
        self._resume = None
        self._epoch_counter = epoch
        self.position = [epoch, start]
        return epoch, start

    def _batches_per_rank(self, ds, epoch: int) -> int:
        if isinstance(ds, _tc.CacheStream):
            return ds.batches_per_shard(epoch, ds.world)
        workers = max(1, self.num_workers)
        return ds.batches_per_shard(epoch, ds.world * workers) * workers

    def mark_consumed(self) -> None:
        """Called by the training step once per batch: the data position a checkpoint records."""
        self.position[1] += 1

    def resume_at(self, epoch: int, batches: int) -> None:
        """Make the next pass over ``epoch`` start after ``batches`` consumed batches (checkpoint resume)."""
        self._resume = (int(epoch), int(batches))

    def state_dict(self) -> dict[str, int]:
        """The data position (saved in Lightning checkpoints)."""
        return {"epoch": int(self.position[0]), "batches": int(self.position[1])}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at(state["epoch"], state["batches"])

    def sample(self, n: int) -> torch.Tensor:
        """Up to ``n`` training samples from seeded random chunks (the same on every rank; of every timestep
        pooled): for b_dec init."""
        chunks, chunk_t = self._chunks(self.train_rows), self._chunk_t(self.train_rows)
        order = _rng(self.seed, 11).permutation(len(chunks))
        parts, have = [], 0
        with open_store(self.store) as st:
            for c in order:
                x, _ = read_samples(st, self.hook, self.timesteps[chunk_t[c]], chunks[c], self.samples)
                parts.append(x)
                have += len(x)
                if have >= n:
                    break
        x = np.concatenate(parts)
        return torch.from_numpy(x[_rng(self.seed, 13).permutation(len(x))[:n]])
