"""Loggers of a training run that survive a resume: the CSV history and the wandb run id.

A run resumed from a checkpoint (``ckpt_path``) continues the same history. Lightning's CSVLogger
deletes an existing ``metrics.csv`` when it starts, and a new WandbLogger opens a new run; here

- the CSV keeps every row logged before the checkpoint's step and drops the later ones (the
  resumed run logs those steps again), so each step appears exactly once;
- every checkpoint flushes the CSV first, so no row logged before a checkpoint is lost to a kill;
- the wandb run id is stored in every checkpoint, and a resumed run reopens that id
  (``resume="allow"``), offline or online.
"""

from __future__ import annotations

import csv
import os
import secrets
from pathlib import Path
from typing import Any

import lightning as L
from extraction.files import atomic_write
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

RUN_ID_KEY = "wandb_run_id"


def checkpoint_info(ckpt_path: str | Path | None) -> tuple[int | None, str | None]:
    """(global step, wandb run id) stored in a checkpoint; (None, None) without one."""
    if ckpt_path is None:
        return None, None
    import torch

    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt_path)!r} does not exist")
    try:
        ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a truncated or foreign file: name it instead of a pickle traceback
        raise ValueError(f"{ckpt_path} is not a readable Lightning checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise ValueError(f"{ckpt_path} is not a Lightning checkpoint (no global_step)")
    return int(ckpt["global_step"]), ckpt.get(RUN_ID_KEY)


class _ResumedWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping the rows of steps before ``keep_before`` instead of deleting the file."""

    def __init__(self, log_dir: str, keep_before: int):
        self.keep_before = keep_before
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows, keys = list(reader), list(reader.fieldnames or [])
        if not keys:
            return
        kept = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) < self.keep_before]
        if len(kept) != len(rows):
            with atomic_write(path) as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
        self.metrics_keys = keys  # the file's header; later rows are appended under it (or it is rewritten)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose ``metrics.csv`` keeps the rows before step ``keep_before`` (None: a fresh file)."""

    def __init__(self, *args: Any, keep_before: int | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.keep_before = keep_before

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.keep_before is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedWriter(self.log_dir, self.keep_before)
        return super().experiment


class RunHistory(L.Callback):
    """Stores the wandb run id in every checkpoint and flushes the loggers before it is written."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.run_id is not None:
            checkpoint[RUN_ID_KEY] = self.run_id
        for lg in trainer.loggers:
            if isinstance(lg, CSVLogger):
                lg.save()


def make_loggers(out: Path, wandb_mode: str, project: str, name: str | None, csv: bool,
                 ckpt_path: str | Path | None) -> tuple[list, RunHistory]:
    """The run's loggers (CSV, wandb) continuing the history of ``ckpt_path``, and the callback that keeps it."""
    step, run_id = checkpoint_info(ckpt_path)
    loggers: list = []
    if csv:
        loggers.append(ResumableCSVLogger(str(out), name="csv", version="", keep_before=step))
    if wandb_mode != "disabled":
        if run_id is None:
            run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], like wandb's own ids
        loggers.append(WandbLogger(project=project, name=name, save_dir=str(out), offline=wandb_mode == "offline",
                                   id=run_id, resume="allow"))
    else:
        run_id = None
    return loggers, RunHistory(run_id)
