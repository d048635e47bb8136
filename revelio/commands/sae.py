"""``revelio sae fit`` and ``revelio sae eval``: train k-sparse autoencoders on an activation store.

The config follows LightningCLI's layout: ``trainer`` (every lightning.Trainer argument), ``model``
(``sae.lightning.SAEModule``'s settings: the stage's ``sae.config.SAEConfig`` itself, which cfg.json records)
and ``data`` (``sae.data.StoreDataModule``), plus ``logging``, ``out``, ``ckpt_path`` and ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sae.config import SAEConfig

from ..cli import command
from ..config import field, to_dict


# Lightning Trainer arguments revelio sets itself (from ``out`` and ``logging``): not config keys.
TRAINER_OWNED = ("self", "logger", "callbacks", "default_root_dir", "enable_checkpointing", "plugins")
ACCELERATORS = Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"]
PRECISIONS = Literal["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "transformer-engine",
                     "transformer-engine-float16", "64", "32", "16", "bf16", 64, 32, 16]


@dataclass
class SAETrainerConfig:
    """Every YAML-able ``lightning.Trainer`` argument, as LightningCLI exposes them (``--trainer.KEY``).

    Written out here, not read from Lightning, so ``--help`` needs no torch; ``tests/test_cli.py`` checks
    the list against the installed ``Trainer.__init__`` signature. Defaults are Lightning's except the
    first nine. ``logger``, ``callbacks``, ``default_root_dir``, ``enable_checkpointing`` and ``plugins``
    are set by revelio (``logging.*`` and ``out``).
    """

    max_steps: int = field(1000, min=-1, help="optimizer steps to train (-1: no limit, then max_epochs/max_time stop)")
    accelerator: ACCELERATORS = field("auto", help="hardware to train on")
    devices: int | str | list[int] = field(1, help="devices (processes) to train on; >1 uses DDP; 'auto' or a list of ids")
    strategy: str = field("auto", help="Lightning strategy: auto | ddp | ddp_spawn | fsdp ... (ddp on CPU uses gloo)")
    num_nodes: int = field(1, min=1, help="machines for multi-node DDP")
    precision: PRECISIONS = field("32-true", help="Lightning precision; the SAE math runs in float32")
    log_every_n_steps: int = field(10, min=1, help="N: scalar metrics (FVU, L0, dead fraction, AuxK, lr, samples) every N steps")
    val_check_interval: int | float | str | dict[str, int] | None = field(
        1.0, help="validate every this many steps (int), share of an epoch (float) or time (DD:HH:MM:SS)")
    enable_progress_bar: bool = field(True, help="show the progress bar")
    fast_dev_run: int | bool = field(False, help="run N (true: 1) train/val batches only, as a smoke test")
    max_epochs: int | None = field(None, help="stop after this many epochs (null: max_steps decides)")
    min_epochs: int | None = field(None, help="train at least this many epochs")
    min_steps: int | None = field(None, help="train at least this many steps")
    max_time: str | dict[str, int] | None = field(None, help="stop after this wall time, DD:HH:MM:SS or {hours: 1}")
    limit_train_batches: int | float | None = field(None, help="batches (int) or share (float) of an epoch to train")
    limit_val_batches: int | float | None = field(None, help="batches (int) or share (float) of validation to run")
    limit_test_batches: int | float | None = field(None, help="unused by sae fit (Lightning's test loop)")
    limit_predict_batches: int | float | None = field(None, help="unused by sae fit (Lightning's predict loop)")
    overfit_batches: int | float = field(0.0, help="train and validate on this many (share of) batches only")
    check_val_every_n_epoch: int | None = field(1, help="validate every N epochs (null: only by val_check_interval)")
    num_sanity_val_steps: int | None = field(None, help="validation batches run before training (null: 2; -1: all)")
    enable_model_summary: bool | None = field(None, help="print the module summary at start")
    accumulate_grad_batches: int = field(1, help="batches whose gradients add up to one optimizer step")
    gradient_clip_val: int | float | None = field(None, help="clip gradients at this value (null: no clipping)")
    gradient_clip_algorithm: Literal["norm", "value"] | None = field(None, help="how gradient_clip_val clips (null: norm)")
    deterministic: bool | Literal["warn"] | None = field(None, help="torch deterministic algorithms (warn: warn only)")
    benchmark: bool | None = field(None, help="cudnn.benchmark")
    inference_mode: bool = field(True, help="validate under torch.inference_mode (else no_grad)")
    use_distributed_sampler: bool = field(True, help="let Lightning wrap samplers for DDP (the store loader shards itself)")
    profiler: Literal["simple", "advanced", "pytorch", "xla"] | None = field(None, help="Lightning profiler")
    detect_anomaly: bool = field(False, help="torch autograd anomaly detection")
    barebones: bool = field(False, help="strip Lightning's extras for speed (no logging/checkpoints: conflicts here)")
    sync_batchnorm: bool = field(False, help="synchronise batch-norm statistics across devices")
    reload_dataloaders_every_n_epochs: int = field(0, help="rebuild the data loaders every N epochs")
    enable_autolog_hparams: bool = field(True, help="log the module's hyperparameters to the loggers")
    model_registry: str | None = field(None, help="Lightning model-registry name to upload checkpoints to")

    def __post_init__(self):
        if self.max_steps == 0:
            from ..config import ConfigError

            raise ConfigError("trainer.max_steps: 0 is out of range; it must be >= 1 (or -1: no limit)")


def trainer_kwargs(cfg: SAETrainerConfig) -> dict:
    """``lightning.Trainer`` keyword arguments of ``cfg``, checked against the installed Trainer's signature.

    A key this Lightning does not take fails (naming the closest argument) unless it holds its default,
    then it is left out, so the list works across Lightning versions.
    """
    import dataclasses
    import inspect

    import lightning

    from ..config import ConfigError, did_you_mean

    params = inspect.signature(lightning.Trainer.__init__).parameters
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in params:
            out[f.name] = value
        elif value != f.default:
            raise ConfigError(f"trainer.{f.name}: lightning {lightning.__version__}'s Trainer has no argument "
                              f"{f.name!r}{did_you_mean(f.name, list(params))}")
    return out


@dataclass
class SAEDataConfig:
    store: str = field("", help="activation store (.h5) written by `revelio extract`")
    hook: str = field("", help="hook (module path) to train on")
    timestep: int = field(25, min=0, max=999, help="timestep to train on (ignored when timesteps is given)")
    timesteps: list[int] = field(default_factory=list, min=0, max=999,
                                 help="several timesteps pooled into one SAE, e.g. [25, 250, 500]; [] = timestep")
    samples: Literal["pooled", "tokens"] = field("pooled", help="pooled: one vector per image; tokens: every position")
    batch_size: int = field(4096, min=1, help="samples per batch and device")
    val_fraction: float = field(0.1, min=0, below=1, help="share of images held out (split by image)")
    chunk_images: int = field(64, min=1, help="images per read chunk")
    buffer_chunks: int = field(16, min=1, help="chunks per shuffle buffer (memory: chunk_images*buffer_chunks images)")
    num_workers: int = field(0, min=0, help="DataLoader worker processes (reader threads on the token cache)")
    pin_memory: bool | None = field(None, help="pin host memory (null: when training on a GPU)")
    check_finite: bool = field(True, help="scan the store once for NaN/inf before training")
    nonfinite: Literal["fail", "skip"] = field("fail", help="on NaN/inf images: fail (listing ids) or skip them")
    token_cache: bool = field(True, help="tokens: read training batches from a pre-shuffled token-major copy written "
                                         "once next to the store (<store>.tokens/); false: the store's shuffle buffers")
    runs_per_batch: int = field(8, min=1, help="token cache: contiguous runs per batch")


@dataclass
class SAELoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = field("offline", help="wandb: offline (default), online or disabled")
    project: str = field("revelio-sae", help="wandb project")
    name: str | None = field(None, help="wandb run name")
    csv: bool = field(True, help="also log scalars to <out>/csv/metrics.csv")
    checkpoint_every_n_steps: int = field(1000, min=1, help="checkpoint every N steps (and last.ckpt)")


@dataclass
class SAEFitConfig:
    trainer: SAETrainerConfig = field(default_factory=SAETrainerConfig, help="")
    model: SAEConfig = field(default_factory=SAEConfig, help="")
    data: SAEDataConfig = field(default_factory=SAEDataConfig, help="")
    logging: SAELoggingConfig = field(default_factory=SAELoggingConfig, help="")
    out: str = field("runs/sae", help="run folder: checkpoints/, csv/, wandb/, histograms/, sae/, metrics.json")
    ckpt_path: str | None = field(None, help="checkpoint to resume exactly (e.g. <out>/checkpoints/last.ckpt)")
    seed: int = field(0, help="seed of init, split and shuffling")


@command("sae fit", SAEFitConfig)
def sae_fit_cmd(cfg: SAEFitConfig) -> dict:
    """Train a k-sparse autoencoder on one hook at one timestep (or several pooled) of an activation store
    (Lightning, wandb + CSV logs)."""
    from sae.train import fit

    if not cfg.data.store or not cfg.data.hook:
        raise ValueError("pass data.store and data.hook (e.g. --data.store runs/acts.h5 --data.hook up_blocks.1)")
    data = to_dict(cfg.data)
    store, hook, timestep = data.pop("store"), data.pop("hook"), data.pop("timestep")
    timesteps = data.pop("timesteps")
    if timesteps:
        timestep = list(timesteps)
    res = fit(store, hook, timestep, cfg.out, model=cfg.model, data=data, trainer=trainer_kwargs(cfg.trainer),
              checkpoint_every_n_steps=cfg.logging.checkpoint_every_n_steps, wandb_mode=cfg.logging.wandb_mode,
              project=cfg.logging.project, run_name=cfg.logging.name, csv=cfg.logging.csv, ckpt_path=cfg.ckpt_path,
              seed=cfg.seed)
    if "sae" in res:
        val = res.get("val", {})
        print(f"sae: {res['steps']} steps, {res['samples_seen']} samples; held-out FVU {val.get('fvu', float('nan')):.4f}, "
              f"L0 {val.get('l0', float('nan')):.2f}, dead {val.get('dead_fraction', float('nan')):.3f} -> {res['sae']}")
        for t, v in val.get("per_timestep", {}).items():
            print(f"  t={t}: held-out FVU {v['fvu']:.4f}, L0 {v['l0']:.2f}")
    return res


@dataclass
class SAEEvalConfig:
    sae: str = field("runs/sae/sae", help="SAE folder (sae_weights.safetensors + cfg.json, SAELens 6 layout)")
    store: str | None = field(None, help="activation store (null: the SAE's source store)")
    split: Literal["val", "train", "all"] = field("val", help="images to evaluate on; val = the held-out split of training")
    batch_size: int = field(4096, min=1, help="samples per batch")
    device: str = field("cpu", help="torch device")
    out: str | None = field(None, help="JSON report and density histogram PNG (null: <sae>/eval_<split>.json)")


@command("sae eval", SAEEvalConfig)
def sae_eval_cmd(cfg: SAEEvalConfig) -> dict:
    """Report FVU, explained variance, L0, dead fraction and feature density of a saved SAE on a held-out split."""
    import numpy as np

    from sae.metrics import log10_density
    from sae.train import evaluate_sae, write_json

    from ..viz import save_figure

    res = evaluate_sae(cfg.sae, cfg.store, cfg.split, cfg.batch_size, cfg.device)
    dens = log10_density(res.pop("density"))
    counts, edges = np.histogram(dens, bins=50)
    res["log10_density_histogram"] = {"counts": counts.tolist(), "edges": edges.tolist()}
    out = Path(cfg.out) if cfg.out else Path(cfg.sae) / f"eval_{cfg.split}.json"
    write_json(out, res)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.stairs(counts, edges, fill=True)
    ax.set_xlabel("log10 firing frequency")
    ax.set_title(f"{res['hook']} t={res['timestep']} ({cfg.split})")
    png = save_figure(fig, out.with_suffix(".png"))
    print(f"{res['hook']} t={res['timestep']} {cfg.split} ({res['n_images']} images, {res['n_samples']} samples): "
          f"FVU {res['fvu']:.4f}  explained variance {res['explained_variance']:.4f}  L0 {res['l0']:.2f}  "
          f"dead {res['dead_fraction']:.3f}  median log10 density {float(np.median(dens)):.2f}")
    for t, v in res.get("per_timestep", {}).items():
        print(f"  t={t}: FVU {v['fvu']:.4f}  L0 {v['l0']:.2f}  dead {v['dead_fraction']:.3f}")
    print(f"report {out}, histogram {png}")
    return res

