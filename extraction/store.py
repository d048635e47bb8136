"""The HDF5 activation store: the writer used by extraction and the reader every other stage uses.

Layout (docs/design.md, "Activation store")::

    /                  attrs: format_version, model, model_class, dataset, config (YAML), seed, created,
                              package_version, identity (JSON of the data-defining config), complete, n_images
    /images/id         (N,) utf-8     stable per-image id
    /images/label      (N,) int64     class label, -1 if none
    /images/caption    (N,) utf-8
    /images/done       (N,) bool      written last per batch: resumability
    /images/source     (N,) int64     index of the row's image in the data set
    /source/index|id|skipped  (M,)    every data-set position this run covers; skipped = unreadable
    /acts/<hook>/t<T>  (N, ...)       float16|float32; attrs layout, hook, timestep, capture, spatial

Rows are the readable images in data-set order (skipped images get no row). Crash safety: the
file skeleton is created in a temporary file and renamed into place; all chunks are allocated
up front (uncompressed stores) so a batch write only touches raw data; each batch is flushed
(and fsynced) before its ``done`` flags are set and flushed again. A SIGKILL at any point therefore
leaves a file whose done rows are whole, and a rerun continues after the last done row.

Disk space: the skeleton of an uncompressed store reserves its whole size on disk (``posix_fallocate``)
before it is renamed into place, so a full disk is reported before the first batch and no later batch
write can meet ENOSPC. Compressed stores (and file systems without fallocate) check the free space
before every batch instead. Any write error ends the run with ``WriteFailed`` ("no space left on device
while writing batch rows 4-5 of <file>"); the rows done before it stay readable and a rerun resumes.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from .files import OutputError, atomic_path, check_free_space, fsync_path, lock_owner, locked_message, write_failed

FORMAT_VERSION = 1
CAPTION_BYTES = 512
CHUNK_BYTES = 64 << 20  # upper bound of one chunk; chunks hold whole rows
LAYOUTS = ("NCHW", "NTC", "NC")


class StoreError(ValueError):
    """A file that is not a (finished) activation store, or one from a different config."""


def act_name(hook: str, t: int) -> str:
    return f"acts/{hook}/t{int(t)}"


def _enc(strings: list[str], nbytes: int) -> np.ndarray:
    """utf-8 encode to fixed width, truncating at a character boundary."""
    out = []
    for s in strings:
        b = s.encode("utf-8")
        if len(b) > nbytes:
            b = b[:nbytes].decode("utf-8", "ignore").encode("utf-8")
        out.append(b)
    return np.array(out, dtype=f"S{nbytes}")


def _dec(arr: np.ndarray) -> np.ndarray:
    return np.array([b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in arr], dtype=object)


@dataclass
class ActSpec:
    """Shape of one stored activation per image, and how to read it."""

    hook: str
    timestep: int
    row_shape: tuple[int, ...]
    layout: str
    capture: str
    spatial: tuple[int, int]


def _dcpl(early: bool) -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if early:
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _new(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any, chunk_rows: int,
         compression: str | None) -> h5py.Dataset:
    chunks = (max(1, min(chunk_rows, shape[0])),) + tuple(shape[1:])
    comp = None if compression in (None, "none") else compression
    return group.create_dataset(name, shape=shape, maxshape=(None,) + tuple(shape[1:]), dtype=dtype, chunks=chunks,
                                compression=comp, dcpl=_dcpl(early=comp is None), fill_time="never")


def create_store(path: str | Path, *, source_index: list[int], source_ids: list[str], specs: list[ActSpec],
                 attrs: dict[str, Any], storage_dtype: str = "float32", batch_size: int = 32,
                 compression: str | None = None) -> Path:
    """Write an empty store skeleton (all datasets allocated) atomically: temp file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = len(source_index)
    id_bytes = max(1, max((len(s.encode()) for s in source_ids), default=1))
    made = False  # an error creating the temporary is passed on as it is (as for atomic_write)
    try:
        with atomic_path(path) as tmp:
            made = True
            with h5py.File(tmp, "w") as f:
                for k, v in attrs.items():
                    f.attrs[k] = v
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["complete"] = False
                f.attrs["n_images"] = 0
                f.attrs["storage_dtype"] = storage_dtype
                img = f.create_group("images")
                rows = max(1, batch_size)
                _new(img, "id", (m,), f"S{id_bytes}", rows, None)
                _new(img, "label", (m,), "int64", rows, None)
                _new(img, "caption", (m,), f"S{CAPTION_BYTES}", rows, None)
                _new(img, "source", (m,), "int64", rows, None)
                done = _new(img, "done", (m,), "bool", rows, None)
                done[...] = False
                src = f.create_group("source")
                src.create_dataset("index", data=np.asarray(source_index, dtype=np.int64))
                src.create_dataset("id", data=_enc(list(source_ids), id_bytes))
                src.create_dataset("skipped", data=np.zeros(m, dtype=bool))
                for s in specs:
                    if s.layout not in LAYOUTS:
                        raise ValueError(f"layout {s.layout!r} is not one of {LAYOUTS}")
                    row_bytes = int(np.prod(s.row_shape)) * np.dtype(storage_dtype).itemsize
                    chunk_rows = max(1, min(batch_size, CHUNK_BYTES // max(1, row_bytes)))
                    d = _new(f, act_name(s.hook, s.timestep), (m, *s.row_shape), storage_dtype, chunk_rows,
                             compression)
                    d.attrs.update(layout=s.layout, hook=s.hook, timestep=int(s.timestep), capture=s.capture,
                                   spatial=np.asarray(s.spatial, dtype=np.int64))
            if compression in (None, "none"):
                _reserve(tmp, path)
    except (ValueError, TypeError):
        raise
    except Exception as e:  # h5py reports a full disk as OSError or RuntimeError; name the cause and the file
        if isinstance(e, OutputError) or not made:
            raise
        raise write_failed(e, "creating", path) from e
    return path


def _reserve(path: str | Path, target: str | Path) -> None:
    """Allocate the file's whole (sparse) size on disk, so that writes into it never meet a full disk."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # no fallocate here: checked per batch
            return
        err = write_failed(e, f"reserving {size / 1e6:.1f} MB for", target)
        raise type(err)(err.errno, f"{err}; free some space and rerun") from e
    finally:
        os.close(fd)


def _is_reserved(path: str | Path) -> bool:
    """Whether every byte of the file is allocated on disk (an uncompressed store whose skeleton was reserved)."""
    st = os.stat(path)
    return getattr(st, "st_blocks", 0) * 512 >= st.st_size


SPACE_MARGIN = 1 << 20  # bytes kept free beyond a batch's raw size for HDF5's metadata (chunk index, attributes)
FINISH_MARGIN = 256 << 10  # free bytes needed to finish a store (trimmed sizes and the final attributes)


@dataclass
class Batch:
    """One batch of finished rows for the writer."""

    positions: np.ndarray  # run positions (into /source) of the readable images, increasing
    ids: list[str]
    labels: np.ndarray
    captions: list[str]
    acts: dict[tuple[str, int], np.ndarray]
    skipped_positions: np.ndarray  # run positions of unreadable images seen in this batch


class StoreWriter:
    """Appends batches to a store skeleton; rows are contiguous in data-set order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.f = h5py.File(self.path, "r+")
        done = self.f["images/done"][...].astype(bool)
        # the done rows are a prefix; a write error inside a batch's done flags may leave some of that batch's
        # flags set (their rows were written and flushed before): keep the leading run, redo the rest
        self.next_row = int(np.argmin(done)) if not done.all() else len(done)
        if done[self.next_row:].any():
            self.f["images/done"][self.next_row:] = False
            self.f.flush()
        self.reserved = _is_reserved(self.path) and all(self.f[n].compression is None for n in _act_datasets(self.f))
        self._caption_bytes = self.f["images/caption"].dtype.itemsize
        self._id_bytes = self.f["images/id"].dtype.itemsize

    def resume_position(self) -> int:
        """The first run position not yet covered by a done row."""
        if self.next_row == 0:
            return 0
        src = self.f["source/index"][...]
        last = int(self.f["images/source"][self.next_row - 1])
        return int(np.searchsorted(src, last)) + 1

    def write(self, b: Batch) -> None:
        """Write data rows, flush, then mark them done and flush again (the done flag is the commit).

        A failed write (full disk, I/O error) raises ``WriteFailed`` naming the rows and the file; the
        rows done before it are untouched.
        """
        k, r = len(b.positions), self.next_row
        what = f"writing batch rows {r}-{r + k - 1} of" if k else "recording skipped images in"
        if not self.reserved:
            need = sum(a.nbytes for a in b.acts.values()) + SPACE_MARGIN
            check_free_space(self.path, need, what)
        try:
            self._write(b)
        except OutputError:
            raise
        except Exception as e:
            raise write_failed(e, what, self.path) from e

    def _write(self, b: Batch) -> None:
        f = self.f
        if len(b.skipped_positions):
            sk = f["source/skipped"]
            for p in b.skipped_positions:
                sk[int(p)] = True
        k = len(b.positions)
        if k:
            r = self.next_row
            for (hook, t), arr in b.acts.items():
                f[act_name(hook, t)][r:r + k] = arr
            f["images/id"][r:r + k] = _enc(b.ids, self._id_bytes)
            f["images/label"][r:r + k] = b.labels
            f["images/caption"][r:r + k] = _enc(b.captions, self._caption_bytes)
            f["images/source"][r:r + k] = f["source/index"][...][b.positions]
        f.flush()
        fsync_path(self.path)  # the rows are on disk before the flags that commit them
        if k:
            f["images/done"][r:r + k] = True
            f.flush()
            fsync_path(self.path)
            self.next_row += k

    def finish(self) -> int:
        """Trim unused rows (skipped images), record skipped ids and mark the store complete."""
        # the last metadata (sizes, the skipped list, complete) may need a little new space even in a reserved store
        n_skip = int(self.f["source/skipped"][...].sum())
        check_free_space(self.path, FINISH_MARGIN + n_skip * (self.f["source/id"].dtype.itemsize + 4), "finishing")
        try:
            return self._finish()
        except OutputError:
            raise
        except Exception as e:
            raise write_failed(e, "finishing", self.path) from e

    def _finish(self) -> int:
        f = self.f
        n = self.next_row
        for name in ("images/id", "images/label", "images/caption", "images/source", "images/done"):
            if f[name].shape[0] != n:
                f[name].resize(n, axis=0)
        for name in _act_datasets(f):
            if f[name].shape[0] != n:
                f[name].resize(n, axis=0)
        skipped = _dec(f["source/id"][...][f["source/skipped"][...]])
        f.attrs["skipped"] = json.dumps(list(skipped))
        f.attrs["n_skipped"] = len(skipped)
        f.attrs["n_images"] = n
        f.flush()
        f.attrs["complete"] = True
        f.flush()
        fsync_path(self.path)
        return n

    def close(self) -> None:
        self.f.close()


def _act_datasets(f: h5py.File) -> list[str]:
    out = []
    for hook in f["acts"]:
        for t in f["acts"][hook]:
            out.append(f"acts/{hook}/{t}")
    return out


class AsyncWriter:
    """A writer thread behind a bounded queue, so compute never waits on disk (and RAM stays flat)."""

    def __init__(self, writer: StoreWriter, depth: int = 2):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.thread = threading.Thread(target=self._loop, name="store-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    self.writer.write(item)
                    self.bytes_written += sum(a.nbytes for a in item.acts.values())
            except BaseException as e:  # surfaced to the caller on the next put/close
                self.error = e
            finally:
                self.q.task_done()

    def drain(self) -> None:
        """Block until every queued batch is on disk (for measurements; the loop never needs it)."""
        self.q.join()

    def _raise(self) -> None:
        if isinstance(self.error, OutputError):  # a full disk / I/O error: its message names the file
            raise self.error
        raise RuntimeError("the store writer failed") from self.error

    def put(self, batch: Batch) -> None:
        if self.error is not None:
            self._raise()
        self.q.put(batch)

    def close(self) -> None:
        """Wait for every queued batch to be written; re-raise a writer error."""
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            self._raise()


# --------------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------------


class ActivationStore:
    """Read-only view of an activation store (also works as a context manager).

    Raises FileNotFoundError for a missing file and StoreError for a file that is not a
    finished store (pass ``allow_incomplete=True`` to read the done rows of a running one).
    """

    def __init__(self, path: str | Path, allow_incomplete: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"activation store {str(self.path)!r} does not exist")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            owner = lock_owner(self.path)
            if owner is not None:  # HDF5 refuses a file another process has open for writing
                raise StoreError(locked_message(self.path, owner)) from e
            raise StoreError(f"{self.path} is not an HDF5 activation store ({e})") from e
        f = self._f
        if "format_version" not in f.attrs or "images" not in f or "acts" not in f:
            f.close()
            raise StoreError(f"{self.path} is not an activation store (no format_version/images/acts)")
        if not bool(f.attrs.get("complete", False)) and not allow_incomplete:
            n = int(f["images/done"][...].sum())
            f.close()
            raise StoreError(f"{self.path} is not a finished store ({n} of its rows are done); rerun the extraction "
                             "command to complete it, or open it with allow_incomplete=True")
        self.attrs: dict[str, Any] = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        self.config: dict[str, Any] = yaml.safe_load(self.attrs.get("config", "")) or {}
        self.attrs["config"] = self.config

    # --- context manager ---
    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, {self.n_images} images, {len(self.keys())} (hook, t) arrays)"

    # --- index ---
    @property
    def hooks(self) -> list[str]:
        return list(self._f["acts"].keys())

    def timesteps(self, hook: str) -> list[int]:
        if hook not in self._f["acts"]:
            raise KeyError(f"hook {hook!r} is not in {self.path.name}; the store has: {', '.join(self.hooks)}")
        return sorted(int(k[1:]) for k in self._f["acts"][hook].keys())

    def keys(self) -> list[tuple[str, int]]:
        return [(h, t) for h in self.hooks for t in self.timesteps(h)]

    def _ds(self, hook: str, t: int) -> h5py.Dataset:
        ts = self.timesteps(hook)
        if int(t) not in ts:
            raise KeyError(f"timestep {t} of hook {hook!r} is not in {self.path.name}; it has timesteps {ts}")
        return self._f[act_name(hook, t)]

    @property
    def done(self) -> np.ndarray:
        return self._f["images/done"][...].astype(bool)

    @property
    def n_images(self) -> int:
        return int(self.done.sum())

    @property
    def ids(self) -> np.ndarray:
        return _dec(self._f["images/id"][...])

    @property
    def labels(self) -> np.ndarray:
        return self._f["images/label"][...].astype(np.int64)

    @property
    def captions(self) -> np.ndarray:
        return _dec(self._f["images/caption"][...])

    @property
    def skipped(self) -> list[str]:
        """Ids of the unreadable images the extraction skipped."""
        return list(_dec(self._f["source/id"][...][self._f["source/skipped"][...].astype(bool)]))

    def layout(self, hook: str, t: int) -> str:
        v = self._ds(hook, t).attrs["layout"]
        return v.decode() if isinstance(v, bytes) else str(v)

    def spatial(self, hook: str, t: int) -> tuple[int, int]:
        h, w = self._ds(hook, t).attrs["spatial"]
        return int(h), int(w)

    def d_in(self, hook: str, t: int) -> int:
        ds = self._ds(hook, t)
        return int(ds.shape[1] if self.layout(hook, t) in ("NCHW", "NC") else ds.shape[2])

    # --- data ---
    def _rows(self, rows: slice | np.ndarray | list[int] | int | None) -> np.ndarray:
        n = self._f["images/done"].shape[0]
        if rows is None:
            return np.flatnonzero(self.done)
        if isinstance(rows, slice):
            return np.arange(n)[rows]
        r = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if len(r) and (np.any(np.diff(r) <= 0) or r[0] < 0 or r[-1] >= n):
            raise ValueError(f"rows must be increasing indices in [0, {n})")
        return r

    def read(self, hook: str, t: int, rows: slice | np.ndarray | list[int] | int) -> np.ndarray:
        """Activations of ``rows`` in the stored layout, as float32."""
        ds = self._ds(hook, t)
        if isinstance(rows, slice):
            return ds[rows].astype(np.float32, copy=False)
        r = self._rows(rows)
        if len(r) == 0:
            return np.zeros((0, *ds.shape[1:]), dtype=np.float32)
        lo, hi = int(r[0]), int(r[-1]) + 1
        if hi - lo == len(r):
            return ds[lo:hi].astype(np.float32, copy=False)
        return ds[r].astype(np.float32, copy=False)

    def iter_batches(self, hook: str, t: int, batch_size: int,
                     rows: np.ndarray | list[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row indices, activations) in order, ``batch_size`` rows at a time (done rows by default)."""
        r = self._rows(rows)
        for i in range(0, len(r), batch_size):
            sel = r[i:i + batch_size]
            yield sel, self.read(hook, t, sel)

    def pooled(self, hook: str, t: int, rows: np.ndarray | list[int] | None = None,
               batch_size: int = 256, grid: int = 1) -> np.ndarray:
        """(n, C): spatial mean over H, W (NCHW) or tokens (NTC); NC stores are returned as they are.

        ``grid`` > 1 keeps coarse layout: the map (tokens reshaped to their h x w grid) is
        average-pooled to ``grid`` x ``grid`` cells (adaptive pooling, as torch's
        ``adaptive_avg_pool2d``) and flattened channel-major to (n, C * grid * grid).
        """
        layout = self.layout(hook, t)
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        if grid > 1 and layout == "NC":
            raise ValueError(f"{hook} t={t} was stored pooled (layout NC); grid pooling needs maps "
                             "(extract with pooling: none)")
        parts = []
        for _, x in self.iter_batches(hook, t, batch_size, rows):
            if grid > 1:
                if layout == "NTC":
                    h, w = self.spatial(hook, t)
                    x = x.reshape(x.shape[0], h, w, x.shape[2]).transpose(0, 3, 1, 2)
                parts.append(_grid_pool(x, grid))
            else:
                parts.append(x.mean(axis=(2, 3)) if layout == "NCHW" else x.mean(axis=1) if layout == "NTC" else x)
        d = self.d_in(hook, t) * grid * grid
        return np.concatenate(parts) if parts else np.zeros((0, d), dtype=np.float32)

    def tokens(self, hook: str, t: int, rows: np.ndarray | list[int] | slice) -> tuple[np.ndarray, np.ndarray]:
        """Every spatial position as its own sample: ((n*P, C) activations, (n*P,) row index)."""
        r = self._rows(rows)
        x = self.read(hook, t, r)
        layout = self.layout(hook, t)
        if layout == "NCHW":
            x = x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)
        elif layout == "NC":
            x = x[:, None, :]
        p = x.shape[1]
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1])), np.repeat(r, p)

    def image_map(self, hook: str, t: int, row: int) -> np.ndarray:
        """One image's activation: (C, h, w) for NCHW and NTC (tokens reshaped row-major to the grid), (C,) for NC."""
        x = self.read(hook, t, [int(row)])[0]
        layout = self.layout(hook, t)
        if layout == "NTC":
            h, w = self.spatial(hook, t)
            return np.ascontiguousarray(x.T.reshape(x.shape[1], h, w))
        return x


def _grid_pool(x: np.ndarray, grid: int) -> np.ndarray:
    """(n, C, H, W) -> (n, C * grid * grid): mean over each cell of the adaptive grid (cell i spans
    rows floor(i*H/g) .. ceil((i+1)*H/g), as torch's adaptive_avg_pool2d)."""
    n, c, hh, ww = x.shape
    out = np.empty((n, c, grid, grid), dtype=np.float32)
    for i in range(grid):
        r0, r1 = (i * hh) // grid, -(-((i + 1) * hh) // grid)
        for j in range(grid):
            c0, c1 = (j * ww) // grid, -(-((j + 1) * ww) // grid)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out.reshape(n, -1)


def store_state(path: str | Path) -> tuple[Any, bool, int]:
    """(identity, complete, rows done) of an existing store file, for a run deciding whether to resume it.

    ``identity`` is the stored JSON (None for a file without one). A file another process holds open for
    writing, or one that is not a readable store, is a ``StoreError`` that says so.
    """
    try:
        with h5py.File(path, "r") as f:
            identity = json.loads(f.attrs.get("identity", "null"))
            complete = bool(f.attrs.get("complete", False))
            done = int(f["images/done"][...].sum())
    except OSError as e:
        owner = lock_owner(path)
        if owner is not None:
            raise StoreError(locked_message(path, owner)) from e
        raise StoreError(f"{path} exists but is not a readable store ({e}); delete it or choose another output")
    return identity, complete, done


def open_store(path: str | Path, allow_incomplete: bool = False) -> ActivationStore:
    """Open an activation store read-only (use as ``with open_store(p) as st:``)."""
    return ActivationStore(path, allow_incomplete=allow_incomplete)


# --------------------------------------------------------------------------------------------------------------
# Multi-process join
# --------------------------------------------------------------------------------------------------------------


def join_shards(shards: list[str | Path], out: str | Path) -> Path:
    """Join finished per-rank shards into one store: /acts as HDF5 virtual datasets, /images and /source copied.

    Virtual sources are stored relative to ``out``'s folder, so the folder can be moved as a whole.
    """
    out = Path(out)
    shards = [Path(s) for s in shards]
    files = [h5py.File(s, "r") for s in shards]
    try:
        for s, f in zip(shards, files):
            if not bool(f.attrs.get("complete", False)):
                raise StoreError(f"shard {s} is not finished; cannot join")
        ns = [int(f["images/done"].shape[0]) for f in files]
        total = sum(ns)
        with atomic_path(out) as tmp:
            with h5py.File(tmp, "w") as g:
                for k, v in files[0].attrs.items():
                    g.attrs[k] = v
                g.attrs["shards"] = json.dumps([os.path.relpath(s, out.parent) for s in shards])
                skipped = [x for f in files for x in json.loads(f.attrs.get("skipped", "[]"))]
                g.attrs["skipped"] = json.dumps(skipped)
                g.attrs["n_skipped"] = len(skipped)
                g.attrs["n_images"] = total
                g.attrs["complete"] = False
                for grp in ("images", "source"):
                    for name in files[0][grp]:
                        g.create_dataset(f"{grp}/{name}", data=np.concatenate([f[f"{grp}/{name}"][...] for f in files]))
                for name in _act_datasets(files[0]):
                    d0 = files[0][name]
                    layout = h5py.VirtualLayout(shape=(total, *d0.shape[1:]), dtype=d0.dtype)
                    start = 0
                    for s, f, n in zip(shards, files, ns):
                        src = h5py.VirtualSource(os.path.relpath(s, out.parent), name, shape=f[name].shape)
                        layout[start:start + n] = src
                        start += n
                    v = g.create_virtual_dataset(name, layout)
                    v.attrs.update(dict(d0.attrs))
                g.attrs["complete"] = True
    finally:
        for f in files:
            f.close()
    return out
