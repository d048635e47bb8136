"""Lightning wrapper of the SAE: optimiser, decoder constraint, dead-latent counters, metrics and histograms.

The math stays in ``sae.model``; this module only schedules it: loss -> backward -> remove the
parallel decoder gradient -> Adam step -> renormalise the decoder -> update the counters.
DDP: gradients are averaged by Lightning; the fired masks, sample counts and the BatchTopK
threshold are reduced across ranks here, so every rank keeps identical counters.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from extraction.files import atomic_path
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from .config import SAEConfig
from .metrics import EvalAccumulator, log10_density
from .model import SparseAutoencoder


class SAEModule(L.LightningModule):
    """Trains a ``SparseAutoencoder`` on batches of (activations, store rows).

    Args:
        d_in: activation width (from the data).
        config: the SAE's settings, a ``sae.config.SAEConfig`` (``revelio sae fit``'s ``model.*`` section), or
        its keys as keywords (``SAEModule(d_in=64, expansion=4, k=8)``): d_sae (or expansion * d_in), k,
        architecture, matryoshka, k_aux, aux_coef, dead_after, encoder_init (see ``SparseAutoencoder``);
        b_dec_init ("mean", "geometric_median", "zeros"); normalize (scale inputs to mean norm sqrt(d_in));
        init_samples (data samples used for b_dec and the normalisation constant); lr (Adam; None = 2e-4 /
        sqrt(d_sae / 2^14), Gao et al.); warmup_steps (linear lr warm-up); decay_fraction (linear decay to 0
        over this last share of max_steps); hist_every (steps between density / decoder-norm histograms, 0:
        never); timestep_conditioning (see ``SparseAutoencoder``).
        seed: of the initial weights. timesteps: the data module's list (several timesteps pooled), batches
        then carry the timestep index of each sample.
        BatchTopK: the inference threshold is calibrated (``SparseAutoencoder.calibrate_threshold``) on
        ``init_samples`` held-out samples before every checkpoint, every validation and when training ends.
    """

    def __init__(self, d_in: int, config: SAEConfig | None = None, seed: int = 0, timesteps: list[int] | None = None,
                 **settings: Any):
        if config is not None and settings:
            raise TypeError(f"pass the SAE's settings as config or as keywords, not both (got {sorted(settings)})")
        cfg = config if config is not None else self.config_of(**settings)
        super().__init__()
        # flat, as the keyword form lists them (checkpoints keep this layout; load_from_checkpoint rebuilds it)
        self.save_hyperparameters({"d_in": d_in, **dataclasses.asdict(cfg), "seed": seed, "timesteps": timesteps})
        self.sae = SparseAutoencoder.from_config(d_in, cfg, seed, timesteps)
        self.config = self.sae.config  # resolved for d_in; what cfg.json records
        d_sae, lr = self.config.d_sae, self.config.lr
        self.lr = lr if lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("window_fires", torch.zeros(d_sae, dtype=torch.float64))  # fires since last histogram
        self.register_buffer("window_samples", torch.zeros((), dtype=torch.float64))
        self._val: EvalAccumulator | None = None

    @staticmethod
    def config_of(**settings: Any) -> SAEConfig:
        """``SAEConfig(**settings)``; a misspelt key is a TypeError that lists the valid ones."""
        try:
            return SAEConfig(**settings)
        except TypeError as e:
            names = [f.name for f in dataclasses.fields(SAEConfig)]
            raise TypeError(f"{e}; the SAE's settings are the SAEConfig keys {', '.join(names)}") from None

    # ---- set-up ---------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is not None and getattr(dm, "d_in", self.sae.d_in) != self.sae.d_in:
            raise ValueError(f"d_in mismatch: the model has d_in={self.sae.d_in}, the data {dm.hook} has d_in={dm.d_in}")
        if dm is not None and getattr(dm, "with_t", False) and self.sae.timesteps != dm.timesteps:
            raise ValueError(f"timesteps mismatch: the model has timesteps {self.sae.timesteps}, the data "
                             f"{dm.timesteps}")
        if not bool(self.initialized):
            x = dm.sample(self.config.init_samples)
            self.sae.init_from_data(x, self.config.b_dec_init, self.config.normalize)
            self.initialized.fill_(True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.sae.parameters(), lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0)
        warm = max(1, self.config.warmup_steps)
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else None
        decay = int(self.config.decay_fraction * total) if total else 0

        def factor(step: int) -> float:
            f = min(1.0, (step + 1) / warm)
            if decay and step >= total - decay:
                f = min(f, max(0.0, (total - step) / decay))
            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- training -------------------------------------------------------------------------------------------
    def _sum(self, t: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum") if self.trainer.world_size > 1 else t

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, rows, *rest = batch  # (x, rows) or, with several timesteps, (x, rows, timestep index)
        out = self.sae.loss(x, t_index=rest[0] if rest else None)
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(self._nonfinite_message(x, rows))
        n = self._sum(torch.tensor(float(x.shape[0]), device=x.device))
        fired = self._sum(out["fires"].double()) > 0
        self.sae.update_dead_counters(fired, int(n))
        if self.sae.architecture == "batchtopk" and out["min_active"] is not None:
            self.sae.update_threshold(self._sum(out["min_active"].double()).float() / self.trainer.world_size)
        self.samples_seen += int(n)
        if hasattr(self.trainer.datamodule, "mark_consumed"):
            self.trainer.datamodule.mark_consumed()
        if self.config.hist_every:  # per-rank counts; summed over ranks when the histogram is drawn
            self.window_fires += out["fires"].double()
            self.window_samples += x.shape[0]
        self.log_dict({"train/loss": out["loss"].detach(), "train/fvu": out["fvu"],
                       "train/explained_variance": 1 - out["fvu"], "train/l0": out["l0"], "train/auxk": out["auxk"],
                       "train/dead_fraction": self.sae.dead_mask().float().mean(),
                       "train/samples_seen": float(self.samples_seen),
                       "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"]}, on_step=True, on_epoch=False)
        return out["loss"]

    def _nonfinite_message(self, x: Tensor, rows: Tensor) -> str:
        bad = ~torch.isfinite(x).all(dim=1)
        ids = self.trainer.datamodule.ids[np.unique(rows[bad].cpu().numpy())] if bad.any() else []
        where = f"NaN/inf activations of images {', '.join(map(str, ids[:20]))}" if len(ids) else "finite inputs"
        return f"non-finite loss at step {self.global_step} from {where}; set data.check_finite true to scan the store"

    def on_before_optimizer_step(self, optimizer) -> None:
        self.sae.remove_parallel_grads()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.set_decoder_unit_norm()  # before any checkpoint of this step is written

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = self.config.hist_every
        if every and self.global_step % every == 0 and self.global_step > 0:
            self._log_histograms()

    # ---- histograms -----------------------------------------------------------------------------------------
    def _log_histograms(self) -> None:
        fires = self._sum(self.window_fires.clone())
        n = float(self._sum(self.window_samples.clone()))
        self.window_fires.zero_()
        self.window_samples.zero_()
        if self.global_rank != 0 or n == 0:
            return
        dens = log10_density((fires / n).cpu().numpy())
        norms = self.sae.W_dec.detach().norm(dim=1).cpu().numpy()
        hists = {"log10 firing frequency": np.histogram(dens, bins=50),
                 "decoder row norm": np.histogram(norms, bins=50, range=(norms.min() - 1e-3, norms.max() + 1e-3))}
        png = self._histogram_png(hists)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                h_dens, h_norm = hists.values()
                logger.log_metrics({"hist/log10_density": wandb.Histogram(np_histogram=h_dens),
                                    "hist/decoder_norm": wandb.Histogram(np_histogram=h_norm),
                                    "hist/png": wandb.Image(str(png))}, step=self.global_step)

    def _histogram_png(self, hists: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
        """Both histograms side by side, written atomically to <run>/histograms/step_XXXXXXXX.png."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        root = Path(self.trainer.default_root_dir) / "histograms"
        root.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        for ax, (label, (counts, edges)) in zip(axes, hists.items()):
            ax.stairs(counts, edges, fill=True)
            ax.set_xlabel(label)
            ax.locator_params(axis="x", nbins=5)
        axes[0].set_title(f"feature density, step {self.global_step}")
        fig.tight_layout()
        out = root / f"step_{self.global_step:08d}.png"
        try:
            with atomic_path(out, ext=".png") as tmp:  # savefig picks the format from the suffix
                fig.savefig(tmp)
        finally:
            plt.close(fig)
        return out

    # ---- BatchTopK threshold ----------------------------------------------------------------------------------
    def calibrate_threshold(self) -> None:
        """BatchTopK: threshold such that L0 = k on a seeded sample of the held-out split (the training split when
        there is none); the same sample on every rank."""
        if self.sae.architecture != "batchtopk" or self.trainer is None or self.trainer.datamodule is None:
            return
        if getattr(self, "_calib_x", None) is None:
            self._calib_x = self._calibration_sample(self.trainer.datamodule, self.config.init_samples, with_t=True)
        x, tix = self._calib_x
        self.sae.calibrate_threshold(x.to(self.device), t_index=tix.to(self.device))

    @staticmethod
    def _calibration_sample(dm, n: int, with_t: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Up to n samples spread over (up to 1024 of) the held-out images (else the training images); with
        several timesteps, over 1024 // T images at each (and ``with_t``: their timestep indices too).

        Activation scales differ between images: a threshold calibrated on training images gave held-out
        L0 4.4-4.5 instead of k = 4 on tiny-sd (docs/sae.md), so the held-out split, whose L0 the
        threshold is meant to set, is used; a few consecutive chunks (``dm.sample``) would be worse still."""
        from extraction.store import open_store

        from .data import read_samples

        rng = np.random.default_rng([int(dm.seed), 17])
        pool = dm.val_rows if len(dm.val_rows) else dm.train_rows
        ts = getattr(dm, "timesteps", [dm.timestep])
        rows = np.sort(rng.permutation(pool)[:max(1, 1024 // len(ts))])
        xs, tis = [], []
        with open_store(dm.store) as st:
            for i, t in enumerate(ts):
                x, _ = read_samples(st, dm.hook, t, rows, dm.samples)
                xs.append(x)
                tis.append(np.full(len(x), i, np.int64))
        x, ti = np.concatenate(xs), np.concatenate(tis)
        keep = rng.permutation(len(x))[:n]
        out = torch.from_numpy(np.asarray(x[keep], dtype=np.float32))
        return (out, torch.from_numpy(ti[keep])) if with_t else out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.sae.architecture == "batchtopk":
            self.calibrate_threshold()  # the state dict is already in the checkpoint: update its copy too
            checkpoint["state_dict"]["sae.threshold"] = self.sae.threshold.detach().clone()

    def on_train_end(self) -> None:
        self.calibrate_threshold()

    # ---- validation -----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.calibrate_threshold()
        self._val = [EvalAccumulator(self.sae.d_in, self.sae.d_sae, self.device)
                     for _ in (self.sae.timesteps or [None])]

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        if len(batch) < 3:
            self._val[0].update(self.sae, batch[0])
            return
        x, tix = batch[0], batch[2]
        for i in range(len(self._val)):  # the same calls on every rank (DDP): an empty part adds nothing
            m = tix == i
            if bool(m.any()):
                self._val[i].update(self.sae, x[m], tix[m])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size > 1:
            for acc in self._val:
                acc.reduce(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        total = EvalAccumulator(self.sae.d_in, self.sae.d_sae, self.device)
        for acc in self._val:
            total.merge(acc)
        if float(total.sums["n"]) == 0 or self.trainer.sanity_checking:
            return
        res = total.result()
        logs = {f"val/{k}": float(v) for k, v in res.items() if k != "density"}
        if len(self._val) > 1:
            for t, acc in zip(self.sae.timesteps, self._val):
                if float(acc.sums["n"]) > 0:
                    logs.update({f"val/{k}_t{t}": float(v) for k, v in acc.result().items()
                                 if k in ("fvu", "l0", "dead_fraction")})
        # already reduced over ranks: sync_dist averages identical values and keeps Lightning from warning
        self.log_dict(logs, sync_dist=True)

    # ---- resume ---------------------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint["state_dict"]["sae.W_dec"].shape[1]
        if saved != self.sae.d_in:
            raise ValueError(f"d_in mismatch: the checkpoint was trained on d_in={saved}, this run has d_in={self.sae.d_in}")
        hp = checkpoint.get("hyper_parameters", {})
        for key, ours in (("timesteps", self.sae.timesteps), ("timestep_conditioning", self.sae.timestep_conditioning)):
            theirs = hp.get(key) or ([] if key == "timesteps" else "none")
            if (list(theirs) != list(ours)) if key == "timesteps" else (theirs != ours):
                raise ValueError(f"{key} mismatch: the checkpoint was trained with {key}={theirs!r}, this run has "
                                 f"{ours!r}")
