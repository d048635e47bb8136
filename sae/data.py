"""Streaming activations of one (hook, timestep) out of an activation store, with bounded memory.

Samples are either one pooled vector per image or every spatial position / DiT token of an
image. The train / validation split is by image. Shuffling: the training images are cut into
chunks of ``chunk_images`` consecutive rows; each epoch visits the chunks in a seeded random
order, ``buffer_chunks`` at a time (the shuffle buffer), and shuffles the samples inside the
buffer. Only one buffer (plus less than one batch carried over) is ever in memory.

The stream is a pure function of (seed, epoch, position), so a resumed run skips to the exact
batch it stopped at without reading what it skips. Groups of chunks are dealt to (rank,
worker) shards; every shard yields the same number of batches per epoch, so DataLoader
workers interleave in a fixed round-robin and DDP ranks step in lockstep.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from extraction.store import open_store
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

SampleMode = Literal["pooled", "tokens"]
SAMPLE_MODES = ("pooled", "tokens")
NONFINITE_POLICIES = ("fail", "skip")


def read_samples(st, hook: str, t: int, rows: np.ndarray, samples: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_samples, C) activations of ``rows`` and the store row of each sample."""
    if samples == "pooled":
        return st.pooled(hook, t, rows), np.asarray(rows)
    return st.tokens(hook, t, rows)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class _Stream(IterableDataset):
    """Batches of (activations float32 (B, C), store rows (B,)) from ``chunks`` of image rows.

    ``shuffle``: the training stream described in the module docstring; otherwise chunks are read in
    order (validation) and the last batch may be short.
    """

    def __init__(self, path: str, hook: str, t: int, samples: str, chunks: list[np.ndarray], per_image: int,
                 batch_size: int, buffer_chunks: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.path, self.hook, self.t, self.samples = path, hook, t, samples
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        # DataLoader asks workers 0, 1, ... in turn; a pass resumed after `start` batches must begin with the
        # worker that owns batch `start`, so worker `wid` plays logical worker (wid + start) % workers.
        wid = (wid + self.start) % workers
        n_shards, shard = self.world * workers, self.rank * workers + wid
        groups = self.groups(self.epoch)[shard::n_shards]
        with open_store(self.path) as st:
            if not self.shuffle:
                for g in groups:
                    x, rows = read_samples(st, self.hook, self.t, np.sort(np.concatenate([self.chunks[c] for c in g])),
                                           self.samples)
                    for i in range(0, len(x), self.batch_size):
                        yield torch.from_numpy(x[i:i + self.batch_size]), torch.from_numpy(rows[i:i + self.batch_size])
                return
            total = self.batches_per_shard(self.epoch, n_shards)
            done = (self.start - wid + workers - 1) // workers if self.start > wid else 0  # round-robin share
            yield from self._shuffled(st, groups, total, done)

    def _shuffled(self, st, groups: list[list[int]], total: int, done: int):
        B = self.batch_size
        skip = done * B  # samples of this shard's stream already consumed
        carry_x = np.zeros((0, 0), np.float32)
        carry_r = np.zeros(0, np.int64)
        emitted = done
        for g in groups:
            if emitted >= total:
                return
            size = self._group_size(g)
            if skip >= size:
                skip -= size
                continue
            x, rows = read_samples(st, self.hook, self.t, np.sort(np.concatenate([self.chunks[c] for c in g])),
                                   self.samples)
            perm = _rng(self.seed, self.epoch, 1 + min(g)).permutation(len(x))[skip:]
            skip = 0
            x, rows = x[perm], rows[perm]
            if len(carry_r):
                x, rows = np.concatenate([carry_x, x]), np.concatenate([carry_r, rows])
            n_full = len(x) // B
            for i in range(n_full):
                if emitted >= total:
                    return
                yield torch.from_numpy(np.ascontiguousarray(x[i * B:(i + 1) * B])), torch.from_numpy(rows[i * B:(i + 1) * B])
                emitted += 1
            carry_x, carry_r = x[n_full * B:], rows[n_full * B:]


class _EpochLoader(DataLoader):
    """A DataLoader that tells its stream the epoch and resume position before each pass."""

    def __init__(self, dataset: _Stream, position, **kw):
        super().__init__(dataset, batch_size=None, **kw)
        self._position = position

    def __iter__(self):
        self.dataset.epoch, self.dataset.start = self._position()
        return super().__iter__()


class StoreDataModule(L.LightningDataModule):
    """Activations of ``hook`` at ``timestep`` from an activation store, split by image.

    Args:
        store: path of the activation store (HDF5).
        hook, timestep: which array to train on.
        samples: "pooled" (one vector per image) or "tokens" (every position / token a sample).
        batch_size: samples per batch and device.
        val_fraction: share of images held out for validation (never split across train/val).
        chunk_images: images per read chunk; buffer_chunks: chunks per shuffle buffer.
        num_workers: DataLoader worker processes; pin_memory: None = when a GPU is used.
        check_finite: scan the split once for NaN/inf; nonfinite: "fail" (error naming the image ids) or "skip".
        seed: split and shuffle seed.
    """

    def __init__(self, store: str, hook: str, timestep: int, samples: SampleMode = "pooled", batch_size: int = 4096,
                 val_fraction: float = 0.1, chunk_images: int = 64, buffer_chunks: int = 16, num_workers: int = 0,
                 pin_memory: bool | None = None, check_finite: bool = True,
                 nonfinite: Literal["fail", "skip"] = "fail", seed: int = 0):
        super().__init__()
        if samples not in SAMPLE_MODES:
            raise ValueError(f"samples {samples!r} is not one of {list(SAMPLE_MODES)}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite {nonfinite!r} is not one of {list(NONFINITE_POLICIES)}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.store, self.hook, self.timestep, self.samples = str(store), hook, int(timestep), samples
        self.batch_size, self.val_fraction = batch_size, val_fraction
        self.chunk_images, self.buffer_chunks = chunk_images, buffer_chunks
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.check_finite, self.nonfinite, self.seed = check_finite, nonfinite, seed
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
            if self.timestep not in st.timesteps(self.hook):
                raise KeyError(f"timestep {self.timestep} of hook {self.hook!r} is not in {self.store}; "
                               f"it has timesteps {st.timesteps(self.hook)}")
            self.d_in = st.d_in(self.hook, self.timestep)
            self.layout = st.layout(self.hook, self.timestep)
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
        self._ready = True

    def nonfinite_rows(self, rows: np.ndarray, st=None) -> list[int]:
        """The store rows among ``rows`` whose activations at (hook, timestep) hold NaN/inf (one scan)."""
        if st is None:
            with open_store(self.store) as st:
                return self.nonfinite_rows(rows, st)
        bad = []
        it = st.iter_batches(self.hook, self.timestep, self.chunk_images, rows)
        for r, x in tqdm(it, total=math.ceil(len(rows) / self.chunk_images), desc="scan for NaN/inf", leave=False,
                         disable=len(rows) <= 4 * self.chunk_images):
            ok = np.isfinite(x.reshape(len(r), -1)).all(axis=1)
            bad.extend(r[~ok].tolist())
        return bad

    def _drop_nonfinite(self, st, rows: np.ndarray) -> np.ndarray:
        bad = self.nonfinite_rows(rows, st)
        if not bad:
            return rows
        ids = [str(self.ids[b]) for b in bad]
        shown = ", ".join(ids[:20]) + (f" ... ({len(ids)} in all)" if len(ids) > 20 else "")
        if self.nonfinite == "fail":
            raise ValueError(f"{len(ids)} image(s) of {self.store} have NaN/inf activations at {self.hook} "
                             f"t={self.timestep}: {shown}; set data.nonfinite skip to train without them")
        log.warning("skipping %d image(s) with NaN/inf activations: %s", len(ids), shown)
        self.skipped_ids = ids
        return np.setdiff1d(rows, np.asarray(bad))

    def _chunks(self, rows: np.ndarray) -> list[np.ndarray]:
        return [rows[i:i + self.chunk_images] for i in range(0, len(rows), self.chunk_images)]

    def _dist(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    # ---- loaders --------------------------------------------------------------------------------------------
    def loader(self, rows: np.ndarray, shuffle: bool) -> DataLoader:
        """Batches of (activations, rows) over ``rows``: the shuffled training stream, or in order."""
        rank, world = self._dist()
        ds = _Stream(self.store, self.hook, self.timestep, self.samples, self._chunks(rows), self.per_image,
                     self.batch_size, self.buffer_chunks, shuffle, self.seed, rank, world)
        pin = self.pin_memory
        if pin is None:  # pin only when batches go to a GPU
            pin = (self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator" if self.trainer is not None
                   else torch.cuda.is_available())
        kw = dict(num_workers=self.num_workers, pin_memory=pin)
        if shuffle:
            return _EpochLoader(ds, self._next_position, **kw)
        return DataLoader(ds, batch_size=None, **kw)

    def train_dataloader(self) -> DataLoader:
        if len(self.train_rows) * self.per_image < self.batch_size:
            raise ValueError(f"{len(self.train_rows)} training images x {self.per_image} samples each is less than one "
                             f"batch ({self.batch_size}); lower data.batch_size or use data.samples tokens")
        loader = self.loader(self.train_rows, shuffle=True)
        shards = loader.dataset.world * max(1, self.num_workers)
        if loader.dataset.batches_per_shard(0, shards) == 0:
            raise ValueError(f"{len(self.train_rows)} training images in chunks of {self.chunk_images}, "
                             f"{self.buffer_chunks} chunks per buffer, leave some of the {shards} (rank x worker) shards "
                             "without a full batch; lower data.chunk_images, data.buffer_chunks, data.num_workers "
                             "or data.batch_size")
        return loader

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_rows, shuffle=False)

    def _next_position(self) -> tuple[int, int]:
        """(epoch, batches already consumed) for the pass that is starting."""
        epoch = self.trainer.current_epoch if self.trainer is not None else self._epoch_counter + 1
        self._epoch_counter = epoch
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start = self._resume[1]
        self._resume = None
        self.position = [epoch, start]
        return epoch, start

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
        """Up to ``n`` training samples from seeded random chunks (the same on every rank): for b_dec init."""
        chunks = self._chunks(self.train_rows)
        order = _rng(self.seed, 11).permutation(len(chunks))
        parts, have = [], 0
        with open_store(self.store) as st:
            for c in order:
                x, _ = read_samples(st, self.hook, self.timestep, chunks[c], self.samples)
                parts.append(x)
                have += len(x)
                if have >= n:
                    break
        x = np.concatenate(parts)
        return torch.from_numpy(x[_rng(self.seed, 13).permutation(len(x))[:n]])
