"""``revelio sae fit`` and ``revelio sae eval``: train k-sparse autoencoders on an activation store.

The config follows LightningCLI's layout: ``trainer`` (lightning.Trainer arguments), ``model``
(``sae.lightning.SAEModule``) and ``data`` (``sae.data.StoreDataModule``), plus ``logging``,
``out``, ``ckpt_path`` and ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..cli import command
from ..config import field, to_dict


@dataclass
class SAETrainerConfig:
    max_steps: int = field(1000, help="optimizer steps to train")
    accelerator: str = field("auto", help="cpu | gpu | auto")
    devices: int | str = field(1, help="devices (processes) to train on; >1 uses DDP")
    strategy: str = field("auto", help="Lightning strategy: auto | ddp | ddp_spawn ... (ddp on CPU uses gloo)")
    num_nodes: int = field(1, help="machines for multi-node DDP")
    precision: str = field("32-true", help="Lightning precision; the SAE math runs in float32")
    log_every_n_steps: int = field(10, help="N: scalar metrics (FVU, L0, dead fraction, AuxK, lr, samples) every N steps")
    val_check_interval: int | float = field(1.0, help="validate every this many steps (int) or at epoch end (1.0)")
    enable_progress_bar: bool = field(True, help="show the progress bar")


@dataclass
class SAEModelConfig:
    expansion: int = field(16, help="d_sae = expansion * d_in (when d_sae is null)")
    d_sae: int | None = field(None, help="dictionary size; overrides expansion")
    k: int = field(32, help="active latents per sample")
    architecture: Literal["topk", "batchtopk"] = field("topk", help="topk | batchtopk")
    matryoshka: list[int] = field(default_factory=list, help="Matryoshka prefix sizes, e.g. [512, 2048]; [] = off")
    k_aux: int | None = field(None, help="AuxK latents (null: d_in // 2)")
    aux_coef: float = field(1 / 32, help="AuxK loss weight")
    dead_after: int = field(10_000_000, help="samples without firing after which a latent is dead")
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = field("geometric_median", help="b_dec init from a data sample")
    normalize: bool = field(True, help="scale inputs so that mean ||x|| = sqrt(d_in) (constant saved with the SAE)")
    encoder_init: Literal["lstsq", "unit", "sparsify"] = field(
        "lstsq", help="encoder start: tied rows of the least-squares length (lstsq), of unit norm (unit), or "
                      "EleutherAI sparsify's nn.Linear init (sparsify)")
    init_samples: int = field(16384, help="samples used for b_dec, the normalisation constant, the lstsq encoder "
                                          "scale and the BatchTopK threshold calibration (held-out samples)")
    lr: float | None = field(None, help="Adam lr (null: 2e-4 / sqrt(d_sae / 2^14))")
    warmup_steps: int = field(100, help="linear lr warm-up steps")
    decay_fraction: float = field(0.0, help="linear lr decay to 0 over this last share of max_steps")
    hist_every: int = field(500, help="M: density and decoder-norm histograms every M steps (0: never)")


@dataclass
class SAEDataConfig:
    store: str = field("", help="activation store (.h5) written by `revelio extract`")
    hook: str = field("", help="hook (module path) to train on")
    timestep: int = field(25, help="timestep to train on")
    samples: Literal["pooled", "tokens"] = field("pooled", help="pooled: one vector per image; tokens: every position")
    batch_size: int = field(4096, help="samples per batch and device")
    val_fraction: float = field(0.1, help="share of images held out (split by image)")
    chunk_images: int = field(64, help="images per read chunk")
    buffer_chunks: int = field(16, help="chunks per shuffle buffer (memory: chunk_images*buffer_chunks images)")
    num_workers: int = field(0, help="DataLoader worker processes")
    pin_memory: bool | None = field(None, help="pin host memory (null: when training on a GPU)")
    check_finite: bool = field(True, help="scan the store once for NaN/inf before training")
    nonfinite: Literal["fail", "skip"] = field("fail", help="on NaN/inf images: fail (listing ids) or skip them")


@dataclass
class SAELoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = field("offline", help="wandb: offline (default), online or disabled")
    project: str = field("revelio-sae", help="wandb project")
    name: str | None = field(None, help="wandb run name")
    csv: bool = field(True, help="also log scalars to <out>/csv/metrics.csv")
    checkpoint_every_n_steps: int = field(1000, help="checkpoint every N steps (and last.ckpt)")


@dataclass
class SAEFitConfig:
    trainer: SAETrainerConfig = field(default_factory=SAETrainerConfig, help="")
    model: SAEModelConfig = field(default_factory=SAEModelConfig, help="")
    data: SAEDataConfig = field(default_factory=SAEDataConfig, help="")
    logging: SAELoggingConfig = field(default_factory=SAELoggingConfig, help="")
    out: str = field("runs/sae", help="run folder: checkpoints/, csv/, wandb/, histograms/, sae/, metrics.json")
    ckpt_path: str | None = field(None, help="checkpoint to resume exactly (e.g. <out>/checkpoints/last.ckpt)")
    seed: int = field(0, help="seed of init, split and shuffling")


@command("sae fit", SAEFitConfig)
def sae_fit_cmd(cfg: SAEFitConfig) -> dict:
    """Train a k-sparse autoencoder on one hook and timestep of an activation store (Lightning, wandb + CSV logs)."""
    from sae.train import fit

    if not cfg.data.store or not cfg.data.hook:
        raise ValueError("pass data.store and data.hook (e.g. --data.store runs/acts.h5 --data.hook up_blocks.1)")
    data = to_dict(cfg.data)
    store, hook, timestep = data.pop("store"), data.pop("hook"), data.pop("timestep")
    res = fit(store, hook, timestep, cfg.out, model=to_dict(cfg.model), data=data, trainer=to_dict(cfg.trainer),
              checkpoint_every_n_steps=cfg.logging.checkpoint_every_n_steps, wandb_mode=cfg.logging.wandb_mode,
              project=cfg.logging.project, run_name=cfg.logging.name, csv=cfg.logging.csv, ckpt_path=cfg.ckpt_path,
              seed=cfg.seed)
    if "sae" in res:
        val = res.get("val", {})
        print(f"sae: {res['steps']} steps, {res['samples_seen']} samples; held-out FVU {val.get('fvu', float('nan')):.4f}, "
              f"L0 {val.get('l0', float('nan')):.2f}, dead {val.get('dead_fraction', float('nan')):.3f} -> {res['sae']}")
    return res


@dataclass
class SAEEvalConfig:
    sae: str = field("runs/sae/sae", help="SAE folder (sae.safetensors + cfg.json)")
    store: str | None = field(None, help="activation store (null: the SAE's source store)")
    split: Literal["val", "train", "all"] = field("val", help="images to evaluate on; val = the held-out split of training")
    batch_size: int = field(4096, help="samples per batch")
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
    print(f"report {out}, histogram {png}")
    return res

