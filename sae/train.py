"""Training and evaluation runs: Trainer + loggers + checkpoints around ``SAEModule`` and ``StoreDataModule``.

Used by ``revelio sae fit`` / ``revelio sae eval`` and from Python (``sae.fit_from_store``).
A run folder holds ``checkpoints/`` (every N steps and ``last.ckpt``), ``csv/`` (CSVLogger),
``wandb/`` (offline unless asked otherwise), ``histograms/`` and, when training ends, the SAE
folder ``sae/`` and ``metrics.json``.
"""

from __future__ import annotations

import errno
import json
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from extraction.files import OutputError, atomic_write, hold_output, write_failed
from extraction.store import open_store
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy

from .config import SAEConfig
from .data import StoreDataModule
from .io import SAEFileError, load, read_cfg, read_config, save
from .lightning import SAEModule
from .logs import RunHistory, make_loggers
from .metrics import evaluate

WANDB_MODES = ("offline", "online", "disabled")


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write JSON atomically (temp file + rename)."""
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, default=str)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file, fsynced and renamed: a full disk or a kill never truncates one,
    and a failed write is a ``WriteFailed`` naming the checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        import torch

        with atomic_write(Path(path), "wb") as f:
            torch.save(checkpoint, f)


# errors of the file system (not of the input): reported as one line naming the file
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)


def _loggers(out: Path, wandb_mode: str, project: str, name: str | None, csv: bool,
             ckpt_path: str | None = None) -> tuple[list, RunHistory]:
    if wandb_mode not in WANDB_MODES:
        raise ValueError(f"logging.wandb_mode {wandb_mode!r} is not one of {list(WANDB_MODES)}")
    return make_loggers(out, wandb_mode, project, name, csv, ckpt_path)  # a resume continues the CSV and wandb run


def check_metrics(res: dict[str, Any], dm: StoreDataModule, rows: np.ndarray, what: str) -> None:
    """Raise FloatingPointError when a metric of ``res`` is NaN/inf, naming the images of ``rows`` that cause it."""
    bad = [k for k in ("fvu", "explained_variance", "l0", "dead_fraction") if k in res and not math.isfinite(res[k])]
    if not bad:
        return
    rows_bad = dm.nonfinite_rows(rows)
    if rows_bad:
        ids = [str(dm.ids[r]) for r in rows_bad]
        cause = (f"NaN/inf activations in {len(ids)} image(s) of {dm.store} at {dm.hook} {dm.t_label}: "
                 + ", ".join(ids[:20]) + (f" ... ({len(ids)} in all)" if len(ids) > 20 else "")
                 + "; set data.check_finite true (and data.nonfinite skip) to leave them out")
    else:
        cause = "the activations are finite, so the SAE's weights or its arithmetic overflowed"
    raise FloatingPointError(f"{what}: {', '.join(bad)} is not finite ({', '.join(f'{k}={res[k]}' for k in bad)}); "
                             f"cause: {cause}")


def fit(store: str | Path, hook: str, timestep: int | list[int], out_dir: str | Path,
        model: SAEConfig | dict[str, Any] | None = None,
        data: dict[str, Any] | None = None, trainer: dict[str, Any] | None = None, checkpoint_every_n_steps: int = 1000,
        wandb_mode: str = "offline", project: str = "revelio-sae", run_name: str | None = None, csv: bool = True,
        ckpt_path: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Train an SAE on ``hook`` at ``timestep`` of ``store`` and export it to ``out_dir/sae``.

    ``timestep`` a list: one SAE on the samples of all these timesteps pooled (``model["timestep_conditioning"]``
    "scale_bias" adds a learned per-timestep scale and bias of the pre-activations); the held-out metrics
    then include ``per_timestep``.

    ``model`` is the SAE's config (``sae.config.SAEConfig``, or its keys as a dict); ``data`` and ``trainer``
    are keyword arguments of ``StoreDataModule`` and ``lightning.Trainer``. ``ckpt_path`` resumes a run exactly. Returns paths and held-out metrics.
    The run holds ``out_dir``'s writer lock: a second ``fit`` into the same folder is refused.
    """
    with hold_output(out_dir):
        return _fit(store, hook, timestep, out_dir, model, data, trainer, checkpoint_every_n_steps, wandb_mode,
                    project, run_name, csv, ckpt_path, seed)


def _fit(store: str | Path, hook: str, timestep: int | list[int], out_dir: str | Path,
         model: SAEConfig | dict[str, Any] | None,
         data: dict[str, Any] | None, trainer: dict[str, Any] | None, checkpoint_every_n_steps: int,
         wandb_mode: str, project: str, run_name: str | None, csv: bool, ckpt_path: str | None,
         seed: int) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, workers=True, verbose=False)
    config = model if isinstance(model, SAEConfig) else SAEModule.config_of(**(model or {}))
    if config.timestep_conditioning != "none" and not isinstance(timestep, (list, tuple)):
        raise ValueError(f"model.timestep_conditioning {config.timestep_conditioning!r} needs several timesteps "
                         "(data.timesteps, e.g. [25, 250, 500])")
    dm = StoreDataModule(str(store), hook, timestep, seed=seed, **(data or {}))
    dm.setup("fit")
    module = SAEModule(dm.d_in, config, seed=seed, timesteps=dm.timesteps if dm.with_t else None)
    tkw = {"max_steps": 1000, "log_every_n_steps": 10, **(trainer or {})}
    if tkw.get("strategy") in ("ddp", "ddp_spawn"):
        # Ranks keep identical buffers by explicit reductions; DDP's per-forward buffer broadcast would also
        # deadlock validation, whose shards differ in length across ranks.
        tkw["strategy"] = DDPStrategy(broadcast_buffers=False, start_method="popen" if tkw["strategy"] == "ddp" else "spawn")
    if len(dm.val_rows) == 0:
        tkw["limit_val_batches"] = 0
    ckpt = ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="step{step:08d}", every_n_train_steps=checkpoint_every_n_steps,
                           save_top_k=-1, save_last=True, auto_insert_metric_name=False)
    loggers, history = _loggers(out, wandb_mode, project, run_name, csv, ckpt_path)
    tkw.setdefault("plugins", [AtomicCheckpointIO()])
    tr = L.Trainer(default_root_dir=str(out), logger=loggers, callbacks=[history, ckpt], **tkw)
    try:  # a failed run (full disk, NaN metrics, a bug) still closes its wandb run: the next fit in this
          # process would otherwise be logged into it
        try:
            tr.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        except OSError as e:  # a checkpoint, a log line or a histogram met a full disk: the checkpoints before it stay
            if isinstance(e, OutputError) or e.errno not in DISK_ERRNOS:
                raise
            raise write_failed(e, "writing", e.filename or out) from e
        result: dict[str, Any] = {"steps": tr.global_step, "samples_seen": int(module.samples_seen)}
        if tr.global_rank == 0:
            if len(dm.val_rows):
                val = evaluate(module.sae, dm.loader(dm.val_rows, shuffle=False), module.device,
                               timesteps=dm.timesteps if dm.with_t else None)
                check_metrics(val, dm, dm.val_rows, f"held-out metrics of the SAE trained in {out}")
                result["val"] = {k: v for k, v in val.items() if k != "density"}
            with open_store(store) as st:
                source = {"model": st.attrs.get("model"), "dataset": st.attrs.get("dataset")}
            extra = {"hook": hook, "timestep": dm.timestep, "source_store": str(Path(store).resolve()), **source,
                     "samples": dm.samples, "layout": dm.layout, "split": {"val_fraction": dm.val_fraction, "seed": seed},
                     "trained_steps": tr.global_step, "samples_seen": int(module.samples_seen)}
            if history.run_id is not None:
                extra["wandb_run_id"] = history.run_id
            result["sae"] = str(save(module.sae, out / "sae", extra=extra))
            result["checkpoints"] = str(out / "checkpoints")
            write_json(out / "metrics.json", result)
    finally:
        _finish_wandb(tr, failed=sys.exc_info()[0] is not None)
    return result


def _finish_wandb(trainer: L.Trainer, failed: bool = False) -> None:
    """Close this fit's wandb run, so that the next fit in the same process starts its own run."""
    if any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)


def fit_from_store(store_path: str | Path, hook: str, timestep: int, out_dir: str | Path, *, expansion: int = 8,
                   k: int = 16, samples: str = "pooled", batch_size: int = 256, max_steps: int = 200,
                   lr: float | None = None, wandb_mode: str = "disabled", **model_kw: Any) -> Path:
    """Train a small SAE quickly on one CPU process (for demos and notebooks); returns the SAE folder."""
    res = fit(store_path, hook, timestep, out_dir,
              model={"expansion": expansion, "k": k, "lr": lr, "warmup_steps": 10, "hist_every": 0,
                     "dead_after": 100 * batch_size, **model_kw},
              data={"samples": samples, "batch_size": batch_size},
              trainer={"max_steps": max_steps, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                       "enable_model_summary": False},
              checkpoint_every_n_steps=max_steps, wandb_mode=wandb_mode)
    return Path(res["sae"])


def evaluate_sae(sae_dir: str | Path, store: str | Path | None = None, split: str = "val", batch_size: int = 4096,
                 device: str = "cpu") -> dict[str, Any]:
    """FVU, L0, dead fraction and density of a saved SAE on the held-out (or train / all) split of its store."""
    splits = ("val", "train", "all")
    if split not in splits:
        raise ValueError(f"split {split!r} is not one of {list(splits)}")
    model = load(sae_dir, device=device)  # a missing, corrupt or inconsistent SAE folder fails here, naming the file
    cfg = read_config(sae_dir)
    for key in ("hook", "timestep"):
        if key not in cfg:
            raise SAEFileError(f"{Path(sae_dir) / 'cfg.json'} names no {key}: it cannot be matched to a store's "
                               "activations")
    store = store or cfg.get("source_store")
    if not store:
        raise ValueError(f"{Path(sae_dir) / 'cfg.json'} names no source store; pass the store explicitly")
    sp = cfg.get("split", {})
    ts = cfg.get("timesteps") or []
    dm = StoreDataModule(str(store), cfg["hook"], ts if len(ts) > 1 else cfg["timestep"],
                         samples=cfg.get("samples", "pooled"),
                         batch_size=batch_size, val_fraction=sp.get("val_fraction", 0.1), seed=sp.get("seed", 0))
    dm.setup("validate")
    if dm.d_in != model.d_in:
        raise ValueError(f"d_in mismatch: the SAE in {sae_dir} was trained on d_in={model.d_in}, {cfg['hook']} "
                         f"{dm.t_label} in {store} has d_in={dm.d_in}")
    rows = {"val": dm.val_rows, "train": dm.train_rows}.get(split)
    if rows is None:
        rows = np.sort(np.concatenate([dm.train_rows, dm.val_rows]))
    if len(rows) == 0:
        raise ValueError(f"the {split} split of {store} is empty (val_fraction {dm.val_fraction})")
    res = evaluate(model, dm.loader(rows, shuffle=False), device, timesteps=dm.timesteps if dm.with_t else None)
    check_metrics(res, dm, rows, f"{split} metrics of {sae_dir} on {store}")
    res.update({"split": split, "n_images": len(rows), "hook": cfg["hook"], "timestep": cfg["timestep"]})
    if dm.with_t:
        res["timesteps"] = dm.timesteps
    return res
