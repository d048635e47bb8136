"""The extraction loop: images -> latents -> (noise to t, ONE hooked denoiser call) per timestep -> store.

Independent of the ``revelio`` package: it takes a diffusers pipeline and any data set with
``len``, ``ids()``, ``iter_samples(indices)`` (skipping unreadable images into ``.skipped``)
and ``class_names``. Rows are the readable images in data-set order; the noise of image ``i``
at timestep ``t`` comes from a generator seeded by (seed, id, t), so a resumed run, a run with
another batch size and a multi-process run all produce the same arrays.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from .adapters import Adapter, get_adapter, grid_for_tokens, sample_generators
from .config import ExtractionPlan
from .files import hold_output
from .hooks import ActivationCapture
from .store import (ActSpec, AsyncWriter, Batch, StoreError, StoreWriter, create_store, join_shards, open_store,
                    store_state)

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}  # the plan's storage_dtype
PROMPT_CACHE = 1024  # distinct prompts whose embeddings are kept


def make_prompt(mode: str, template: str, caption: str, label: int, class_names: Sequence[str]) -> str:
    """The conditioning text of one image: '' (empty), its caption, or ``template`` with {label}/{label_id}."""
    if mode == "empty":
        return ""
    if mode == "caption":
        return caption
    name = class_names[label] if 0 <= label < len(class_names) else str(label)
    try:
        return template.format(label=name, label_id=label)
    except (KeyError, IndexError) as e:
        raise ValueError(f"prompt template {template!r} may only use {{label}} and {{label_id}}") from e


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_positions(n: int, rank: int, world: int) -> range:
    """Contiguous block of data-set positions for ``rank`` (concatenating ranks gives data-set order)."""
    lo, hi = n * rank // world, n * (rank + 1) // world
    return range(lo, hi)


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.parent / f"{out.name}.shards" / f"rank{rank:03d}-of-{world:03d}.h5"


@dataclass
class Summary:
    path: str
    images: int
    skipped: list[str]
    bytes: int
    seconds: float
    already_complete: bool = False


class Extractor:
    """Run one extraction plan with one pipeline (one rank's share of the data set)."""

    def __init__(self, pipe: Any, plan: ExtractionPlan):
        plan.validate()
        self.plan = plan
        self.adapter: Adapter = get_adapter(pipe)
        self.adapter.check_hooks(plan.hooks)  # before any work
        self.dtype = TORCH_DTYPES[plan.storage_dtype]
        self._prompt_cache: OrderedDict[str, dict[str, Any]] = OrderedDict()

    # --- compute ---------------------------------------------------------------------------------------------
    def _cond(self, prompts: list[str]) -> dict[str, Any]:
        """Prompt conditioning for a batch; recent distinct prompts are cached (bounded, so RAM stays flat)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if todo:
            enc = self.adapter.encode_prompts(todo)
            for i, p in enumerate(todo):
                self._prompt_cache[p] = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and k != "txt_ids" else v)
                                         for k, v in enc.items()}
        parts = [self._prompt_cache[p] for p in prompts]
        for p in prompts:
            self._prompt_cache.move_to_end(p)
        while len(self._prompt_cache) > PROMPT_CACHE:
            self._prompt_cache.popitem(last=False)
        return {k: (torch.cat([q[k] for q in parts]) if k != "txt_ids" else parts[0][k]) for k in parts[0]}

    def compute(self, images: list[Any], ids: list[str], prompts: list[str]) -> dict[tuple[str, int], torch.Tensor]:
        """Activations of every (hook, t) for one batch of images (on CPU, storage dtype)."""
        ad = self.adapter
        size = self.plan.size if self.plan.size is not None else min(images[0].size)  # no data.size: their own
        latents = ad.encode_images(ad.preprocess(images, size))
        return self.capture_batch(latents, ids, self._cond(prompts))

    def capture_batch(self, latents: torch.Tensor, ids: list[str], cond: dict[str, Any]
                      ) -> dict[tuple[str, int], torch.Tensor]:
        """Noise clean latents to each timestep and run ONE hooked denoiser call per timestep."""
        ad, plan = self.adapter, self.plan
        out: dict[tuple[str, int], torch.Tensor] = {}
        # activations stay on the device until the batch's last forward, so no copy interrupts the kernel queue
        with ActivationCapture(ad, plan.hooks, plan.capture, plan.pooling, self.dtype, device=None) as cap:
            for t in plan.timesteps:
                noisy = ad.noise(latents, int(t), sample_generators(plan.seed, ids, int(t)))
                cap.reset(ad.n_image_tokens(latents))
                ad.forward(noisy, int(t), cond)
                for h in plan.hooks:
                    if h not in cap.acts:
                        raise RuntimeError(f"hook {h!r} did not run in the forward pass at t={t}")
                    out[(h, int(t))] = cap.acts[h]
        self._latent_hw = (int(latents.shape[-2]), int(latents.shape[-1]))
        return {k: v.to("cpu") for k, v in out.items()}

    def specs(self, acts: dict[tuple[str, int], torch.Tensor]) -> list[ActSpec]:
        """Store layout of each (hook, t) from one computed batch."""
        specs = []
        for (h, t), x in acts.items():
            if x.ndim == 2:
                layout, spatial = "NC", (1, 1)
            elif x.ndim == 4:
                layout, spatial = "NCHW", (int(x.shape[2]), int(x.shape[3]))
            else:
                layout, spatial = "NTC", grid_for_tokens(int(x.shape[1]), *self._latent_hw)
            specs.append(ActSpec(h, t, tuple(int(s) for s in x.shape[1:]), layout, self.plan.capture, spatial))
        return specs

    # --- run -------------------------------------------------------------------------------------------------
    def _attrs(self) -> dict[str, Any]:
        p = self.plan
        prov = p.provenance()
        return {
            "model": str(prov.get("model", "")),
            "model_class": type(self.adapter.pipe).__name__,
            "denoiser_class": type(self.adapter.denoiser).__name__,
            "family": self.adapter.family,
            "dataset": str(prov.get("dataset", "")),
            "config": yaml.safe_dump(prov.get("config", {}), sort_keys=False),
            "identity": json.dumps(p.identity(), sort_keys=True),
            "seed": int(p.seed),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "package_version": str(prov.get("package_version", "")),
            "hooks": json.dumps(p.hooks),
            "timesteps": json.dumps([int(t) for t in p.timesteps]),
            "capture": p.capture,
            "pooling": p.pooling,
            "prompt_mode": p.prompt,
        }

    def _check_identity(self, path: Path) -> tuple[bool, int]:
        """(complete, rows done) of an existing store, refusing one written with a different config."""
        stored, complete, done = store_state(path)
        ours = self.plan.identity()
        if stored != ours:
            keys = sorted(set(stored or {}) | set(ours))
            diff = [k for k in keys if (stored or {}).get(k) != ours.get(k)]
            detail = "; ".join(f"{k}: file has {(stored or {}).get(k)!r}, config has {ours.get(k)!r}"
                               for k in diff)
            raise StoreError(f"{path} was written with a different config ({detail}); refusing to append. "
                             "Choose another output path or delete the file.")
        return complete, done

    def run(self, dataset: Any, path: str | Path, positions: Sequence[int] | None = None) -> Summary:
        """Extract ``positions`` of ``dataset`` (all by default) into the store at ``path``, resuming if present.

        The run holds ``path``'s writer lock (``extraction.files.hold_output``): a second writer is refused.
        """
        with hold_output(path):
            return self._run(dataset, Path(path), positions)

    def _run(self, dataset: Any, path: Path, positions: Sequence[int] | None = None) -> Summary:
        plan = self.plan
        positions = list(range(len(dataset)) if positions is None else positions)
        all_ids = dataset.ids()
        ids_of = [all_ids[i] for i in positions]
        class_names = list(getattr(dataset, "class_names", []) or [])
        t0 = time.perf_counter()
        start, writer = 0, None
        if path.exists():
            complete, done = self._check_identity(path)
            if complete:
                print(f"{path}: already complete ({done} images); nothing to do")
                return Summary(str(path), done, [], path.stat().st_size, 0.0, already_complete=True)
            writer = StoreWriter(path)
            start = writer.resume_position()
            if start:
                print(f"{path}: resuming after {writer.next_row} done images (position {start} of {len(positions)})")
        aw: AsyncWriter | None = AsyncWriter(writer) if writer is not None else None
        pending_skips: list[int] = []
        bar = tqdm(total=len(positions), initial=start, unit="img", desc="extract", disable=not plan.progress,
                   dynamic_ncols=True)
        try:
            for b0 in range(start, len(positions), plan.batch_size):
                pos = list(range(b0, min(b0 + plan.batch_size, len(positions))))
                by_id = {ids_of[p]: p for p in pos}
                samples = list(dataset.iter_samples([positions[p] for p in pos]))
                skipped = [by_id[s] for s in getattr(dataset, "skipped", [])]
                if not samples:
                    pending_skips += skipped
                    bar.update(len(pos))
                    continue
                ids = [s.id for s in samples]
                prompts = [make_prompt(plan.prompt, plan.template, s.caption, int(s.label), class_names)
                           for s in samples]
                acts = self.compute([s.image for s in samples], ids, prompts)
                if aw is None:
                    create_store(path, source_index=positions, source_ids=ids_of, specs=self.specs(acts),
                                 attrs=self._attrs(), storage_dtype=plan.storage_dtype, batch_size=plan.batch_size,
                                 compression=plan.compression)
                    writer = StoreWriter(path)
                    aw = AsyncWriter(writer)
                aw.put(Batch(positions=np.array([by_id[i] for i in ids]), ids=ids,
                             labels=np.array([int(s.label) for s in samples], dtype=np.int64),
                             captions=[s.caption for s in samples],
                             acts={k: v.numpy() for k, v in acts.items()},
                             skipped_positions=np.array(pending_skips + skipped, dtype=np.int64)))
                pending_skips = []
                bar.update(len(pos))
            if aw is None:
                raise StoreError(f"no readable image among the {len(positions)} requested; nothing was written")
            if pending_skips:
                aw.put(Batch(np.zeros(0, np.int64), [], np.zeros(0, np.int64), [], {},
                             np.array(pending_skips, dtype=np.int64)))
            aw.close()
            n = writer.finish()
            skipped_ids = json.loads(writer.f.attrs["skipped"])
            written = aw.bytes_written
        except BaseException:
            if aw is not None and aw.thread.is_alive():
                aw.q.put(None)
                aw.thread.join()
            if writer is not None:
                try:
                    writer.close()
                except Exception as e:  # the first error is the one to report; the done rows are already on disk
                    log.warning("closing %s after an error also failed: %s", path, e)
                writer = None
            raise
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        secs = time.perf_counter() - t0
        summ = Summary(str(path), n, skipped_ids, path.stat().st_size, secs)
        print(f"extract: {n} images done, {len(skipped_ids)} skipped, {summ.bytes / 1e6:.1f} MB at {path} "
              f"({(len(positions) - start) / max(secs, 1e-9):.1f} img/s, {written / max(secs, 1e-9) / 1e6:.1f} MB/s "
              f"written)")
        return summ


def extract(pipe: Any, dataset: Any, plan: ExtractionPlan) -> Summary:
    """Run ``plan`` with ``pipe`` on ``dataset`` (see ``run_extraction``)."""
    return run_extraction(Extractor(pipe, plan), dataset)


def run_extraction(ex: Extractor, dataset: Any) -> Summary:
    """Run on ``dataset``; under torchrun each rank writes a shard and rank 0 joins them into ``plan.out``."""
    out = Path(ex.plan.out)
    rank, world = dist_info()
    if world == 1:
        return ex.run(dataset, out)
    with hold_output(out):  # rank 0 only: the other ranks lock nothing (their shards belong to rank 0's job)
        return _run_ranks(ex, dataset, out, rank, world)


def _run_ranks(ex: Extractor, dataset: Any, out: Path, rank: int, world: int) -> Summary:
    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        summ = ex.run(dataset, shard_path(out, rank, world), shard_positions(len(dataset), rank, world))
        dist.barrier()
        if rank == 0:
            shards = [shard_path(out, r, world) for r in range(world)]
            join_shards(shards, out)
            print(f"extract: joined {world} shards into {out} (HDF5 virtual datasets)")
            with open_store(out) as st:
                summ = Summary(str(out), int(st.attrs["n_images"]), json.loads(st.attrs["skipped"]),
                               out.stat().st_size, summ.seconds)
        dist.barrier()
        return summ
    finally:
        if own_group:
            dist.destroy_process_group()

