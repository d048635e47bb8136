"""Train the zoo's tiny text-to-image models on the ``shapes`` world (``revelio zoo train``).

Order: a tiny AutoencoderKL first (64x64 RGB -> 4x16x16 latents), then ``tiny-sd`` (UNet,
epsilon prediction on the DDPM schedule) and ``tiny-flux`` (MM-DiT, rectified flow) on its
latents. Both denoisers are trained jointly with their small text encoders, with ~10% of
captions dropped to "" so classifier-free guidance works. The architectures are the zoo
builders' (``builders.py``); the extraction adapters noise the latents, encode the captions (the
pipelines' own ``encode_prompt``) and make the denoiser call, so training, extraction and
generation see identical conditioning. Shapes images are rendered once into a
tensor cache.

Every step's randomness is a function of (seed, stage, global step): the batch indices come
from ``StepBatches`` (a permutation per (seed, epoch), entered at any step), and crops,
flips, latent samples, noise, timesteps and dropped captions from a generator seeded per
step (``step_generator``). A stage checkpoints (Lightning: net, EMA, optimizer, scheduler,
step) every ``checkpoint_every`` steps and when it stops (``max_minutes`` included), each
file written atomically; ``resume`` continues from it, and K steps in one go equal K/2,
stop, K/2 resumed, bit for bit.

Colour x shape pairs listed in ``holdout`` never appear in any training image, so the
quality benchmark can test generalisation to unseen combinations.
"""

from __future__ import annotations

import copy
from functools import partial
import hashlib
import json
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from extraction.adapters import get_adapter
from extraction.files import atomic_path

from ..config import to_dict
from ..datasets.shapes import Shapes
from . import cache_dir, resolve_dtype
from .builders import (IMAGE_SIZE, ROPE_AXES, VAE_FACTORS, build_tiny_flux, build_tiny_sd, build_tiny_sd3, build_vae,
                       drop_pooled_text, scale_qk_norms, zero_init_modulation)
from .config import ALL_STAGES, DEFAULT_HOLDOUT, STAGES, TRAIN_CONFIG_FILE, StageConfig, ZooTrainConfig  # noqa: F401 (re-exported)


def check_config(cfg: ZooTrainConfig) -> None:
    """Fail early, naming the valid choices, on a config that cannot train."""
    if cfg.model not in STAGES + ["all"]:
        raise ValueError(f"unknown zoo model {cfg.model!r}; valid: {', '.join(STAGES + ['all'])}")
    if not 0 <= cfg.single_fraction <= 1 or not 0 <= cfg.caption_dropout < 1:
        raise ValueError("single_fraction must be in [0, 1] and caption_dropout in [0, 1)")
    from ..datasets.shapes import COLORS, SHAPES

    valid = {f"{c} {s}" for c in COLORS for s in SHAPES}
    bad = [p for p in cfg.holdout if p not in valid]
    if bad:
        raise ValueError(f"holdout pairs {bad} are not 'colour shape' pairs; colours: {', '.join(COLORS)}; "
                         f"shapes: {', '.join(SHAPES)}")
    if not 8 <= cfg.vae_crop <= IMAGE_SIZE or cfg.vae_crop % 8:
        raise ValueError(f"vae_crop must be a multiple of 8 in [8, {IMAGE_SIZE}], got {cfg.vae_crop}")
    if cfg.checkpoint_every < 0 or cfg.min_snr_gamma < 0 or cfg.edge_weight < 0:
        raise ValueError("checkpoint_every, min_snr_gamma and edge_weight must be >= 0")
    for key, stage in (("vae", cfg.vae), ("sd", cfg.sd), ("sd3", cfg.sd3)):
        if stage.heads or stage.head_dim:  # checked before any stage runs: with model 'all' the VAE would train first
            raise ValueError(f"{key}.heads / head_dim set tiny-flux's attention heads only; leave them 0 (got "
                             f"{stage.heads} / {stage.head_dim})")
        if stage.layers or stage.single_layers != -1:
            raise ValueError(f"{key}.layers / single_layers set tiny-flux's blocks only; leave them 0 / -1")
        if stage.vae_factor or stage.vae_channels:
            raise ValueError(f"{key}.vae_factor / vae_channels set tiny-flux's VAE only; leave them 0 (got "
                             f"{stage.vae_factor} / {stage.vae_channels})")
    for key, stage in (("vae", cfg.vae), ("sd", cfg.sd), ("sd3", cfg.sd3)):
        if stage.teacher or stage.init_from or stage.teacher_from_step or stage.adaln_zero:
            raise ValueError(f"{key}.teacher / teacher_from_step / init_from / adaln_zero are tiny-flux settings; "
                             "leave them unset")
    if not (cfg.vae.pooled_text and cfg.sd.pooled_text and cfg.sd3.pooled_text):
        raise ValueError("pooled_text is a tiny-flux setting (flux.pooled_text); leave it true for vae, sd and sd3")
    if any(st.qk_scale != 1.0 for st in (cfg.vae, cfg.sd, cfg.sd3)):
        raise ValueError("qk_scale is a tiny-flux setting (flux.qk_scale); leave it 1 for vae, sd and sd3")
    if not cfg.vae.train_text:
        raise ValueError("vae.train_text: the VAE has no text encoder; train_text is a denoiser setting (sd, flux, sd3)")
    if cfg.flux.init_from and (cfg.flux.adaln_zero or cfg.flux.qk_scale != 1.0):
        raise ValueError("flux.adaln_zero / qk_scale set the seeded random init; with flux.init_from the run starts "
                         f"from the weights of {cfg.flux.init_from} instead, so leave them unset")
    if cfg.flux.teacher and vae_of(cfg, "tiny-flux") != (4, 4):
        raise ValueError("flux.teacher needs tiny-flux on the shared VAE (flux.vae_factor 4, vae_channels 4): the "
                         "teacher's prediction must be of the same latents")
    if cfg.flux.head_dim and cfg.flux.head_dim not in ROPE_AXES:  # before any stage runs, as the keys above
        raise ValueError(f"flux.head_dim must be 0 or one of {sorted(ROPE_AXES)}, got {cfg.flux.head_dim}")
    if cfg.flux.vae_factor and cfg.flux.vae_factor not in VAE_FACTORS:
        raise ValueError(f"flux.vae_factor must be 0 or one of {VAE_FACTORS}, got {cfg.flux.vae_factor}")
    resolve_dtype(cfg.save_dtype)


# ---------------------------------------------------------------- data


def workdir(cfg: ZooTrainConfig) -> Path:
    """Where the rendered images and the intermediate VAE live."""
    return Path(cfg.workdir) if cfg.workdir else cache_dir() / "zoo-train"


def data_key(cfg: ZooTrainConfig, multi: bool = False) -> str:
    """A name that changes whenever the rendered training images would (``multi``: the second set)."""
    hold = "_".join(sorted(cfg.holdout)).replace(" ", "-")
    up = "-upright" if cfg.upright else ""
    if multi:
        return f"shapes{IMAGE_SIZE}{up}-multi-n{cfg.multi_images}-seed{cfg.seed}-hold{hold}"
    return f"shapes{IMAGE_SIZE}{up}-n{cfg.images}-single{cfg.single_fraction}-seed{cfg.seed}-hold{hold}"


def render_cache(cfg: ZooTrainConfig, multi: bool = False) -> tuple[torch.Tensor, list[str]]:
    """The training images (N, 3, 64, 64) uint8 and captions, rendered once and cached on disk.

    The first set: single-object and 1-3-object images from two seed streams of the shapes world
    (``single_fraction`` of them single). ``multi``: the curriculum's second set, ``multi_images`` images of
    1-3 objects from a third stream. Any image containing a held-out pair is skipped.
    """
    root = workdir(cfg)
    path = root / f"{data_key(cfg, multi)}.pt"
    if path.exists():
        blob = torch.load(path)
        return blob["images"], blob["captions"]
    rot = not cfg.upright
    if multi:
        total = cfg.multi_images
        streams = [(Shapes(IMAGE_SIZE, count=10**9, seed=cfg.seed + 2, max_objects=3, rotate=rot), total)]
    else:
        total, n_single = cfg.images, round(cfg.images * cfg.single_fraction)
        streams = [(Shapes(IMAGE_SIZE, count=10**9, seed=cfg.seed, max_objects=1, rotate=rot), n_single),
                   (Shapes(IMAGE_SIZE, count=10**9, seed=cfg.seed + 1, max_objects=3, rotate=rot), cfg.images - n_single)]
    images = torch.empty(total, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    captions: list[str] = []
    with tqdm(total=total, desc="render shapes" + (" (multi-object set)" if multi else "")) as bar:
        for ds, want in streams:
            i = 0
            while want > 0:
                s = ds[i]
                i += 1
                if any(p in s.caption for p in cfg.holdout):
                    continue
                images[len(captions)] = torch.from_numpy(np.array(s.image)).permute(2, 0, 1)
                captions.append(s.caption)
                want -= 1
                bar.update()
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"images": images, "captions": captions}, tmp)
    return images, captions


class ImageCaptions(Dataset):
    """Cached uint8 images with captions (crops and flips are drawn per step by the training step)."""

    def __init__(self, images: torch.Tensor, captions: list[str]):
        self.images, self.captions = images, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.images[i], "caption": self.captions[i]}


class LatentCaptions(Dataset):
    """VAE posterior (mean, std) per image; the training step draws a latent sample and scales it."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: list[str]):
        self.mean, self.std, self.captions = mean, std, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"mean": self.mean[i], "std": self.std[i], "caption": self.captions[i]}


class StepBatches(Sampler[list[int]]):
    """Batches of indices as a function of (seed, step): epoch e is a permutation seeded by (seed, e),
    cut into ``n // batch_size`` batches; iteration starts at step ``start`` and never ends.

    ``second`` = (from_step, m[, origin]): from that step on, batches are drawn the same way from indices
    n .. n+m-1 (the curriculum's second image set, appended to the dataset), with epochs counted from
    ``origin`` (default ``from_step``); steps before it are the same as without ``second``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, second: tuple[int, ...] | None = None):
        if n < batch_size or (second and second[1] < batch_size):
            raise ValueError(f"batch_size {batch_size} is larger than the {n if n < batch_size else second[1]} "
                             "training images")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.second = second if second and second[0] > 0 else None
        self.per_epoch = n // batch_size

    def batch(self, step: int) -> list[int]:
        n, base, per, seed = self.n, 0, self.per_epoch, self.seed * 100_003
        if self.second and step >= self.second[0]:
            n, base, step = self.second[1], self.n, step - (self.second[2] if len(self.second) > 2 else self.second[0])
            per, seed = n // self.batch_size, seed + 50_000
        epoch, k = divmod(step, per)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        return (perm[k * self.batch_size:(k + 1) * self.batch_size] + base).tolist()

    def __iter__(self):
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of all random draws of one training step (independent of any earlier step)."""
    key = hashlib.sha256(f"{seed}/{stage}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


def _loader(ds: Dataset, batch_size: int, seed: int, start: int = 0, second: tuple[int, ...] | None = None
            ) -> DataLoader:
    n = len(ds) - (second[1] if second else 0)
    return DataLoader(ds, batch_sampler=StepBatches(n, batch_size, seed, start, second), num_workers=0)


# ---------------------------------------------------------------- Lightning modules

VAE_SHA_KEY = "revelio_vae_sha"  # the denoiser checkpoint's record of its VAE (vae_fingerprint)


def trainable_nets(adapter, stage: StageConfig) -> dict[str, torch.nn.Module]:
    """What a denoiser stage trains: the denoiser and the text encoders, or (``stage.train_text`` false) the
    denoiser only, the text encoders frozen (``requires_grad`` off) at the weights the pipeline holds."""
    nets = adapter.trainable()
    if not stage.train_text:
        for key in [k for k in nets if k != adapter.denoiser_key]:
            nets.pop(key).requires_grad_(False).eval()  # eval: no T5 dropout in a frozen encoder
    return nets


class _EMAModule(L.LightningModule):
    """Shared training plumbing: AdamW with warm-up on ``self.net``, an EMA copy, dropped captions."""

    name = "stage"
    vae_sha: str | None = None  # a denoiser's: the fingerprint of the VAE whose latents it learns
    vae_dir: Path | None = None  # ... and where that VAE lies (check_checkpoint_vae)

    def __init__(self, net: torch.nn.ModuleDict, stage: StageConfig, caption_dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.net, self.stage, self.caption_dropout, self.seed = net, stage, caption_dropout, seed
        self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(stage.ema_decay), use_buffers=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.vae_sha:
            checkpoint[VAE_SHA_KEY] = self.vae_sha

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.stage.lr, weight_decay=0.0)
        warm = self.stage.warmup_steps or max(1, self.stage.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, self.stage, warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.net)  # here, not in on_train_batch_end: checkpoints written then include it

    def generator(self) -> torch.Generator:
        """This step's generator (see ``step_generator``)."""
        return step_generator(self.seed, self.name, self.global_step)

    def randn(self, shape, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(self.device)

    def drop_captions(self, captions: list[str], gen: torch.Generator) -> list[str]:
        keep = torch.rand(len(captions), generator=gen) >= self.caption_dropout
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    def ema_net(self) -> torch.nn.ModuleDict:
        return self.ema.module


class VAEModule(_EMAModule):
    """AutoencoderKL: per-pixel MSE plus a small KL to a unit Gaussian (a smooth latent space to diffuse in)."""

    name = "vae"

    def __init__(self, vae, stage: StageConfig, cfg: "ZooTrainConfig", factor: int = 4, channels: int = 4):
        super().__init__(torch.nn.ModuleDict({"vae": vae}), stage, seed=cfg.seed)
        self.name = vae_stage(factor, channels)  # checkpoint file and random stream of this VAE
        self.kl_weight, self.edge_weight = cfg.kl_weight, cfg.edge_weight
        self.crop, self.full_from = cfg.vae_crop, cfg.vae_full_from

    def augment(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Floats in [-1, 1]; a random ``crop`` window per image (whole images after ``full_from``), random flips."""
        x = images.float() / 127.5 - 1
        side = x.shape[-1]
        crop = side if self.global_step >= self.full_from * self.stage.steps else self.crop
        corners = torch.randint(0, side - crop + 1, (len(x), 2), generator=gen).tolist()
        flips = (torch.rand(len(x), generator=gen) < 0.5).tolist()
        out = [im[:, y0:y0 + crop, x0:x0 + crop] for im, (y0, x0) in zip(x, corners)]
        return torch.stack([im.flip(-1) if f else im for im, f in zip(out, flips)])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        vae = self.net["vae"]
        gen = self.generator()
        x = self.augment(batch["pixels"].cpu(), gen).to(self.device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean + post.std * self.randn(post.mean.shape, gen)).sample
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = mse + self.kl_weight * kl
        if self.edge_weight:
            edge = sum(F.l1_loss(rec.diff(dim=d), x.diff(dim=d)) for d in (-1, -2))
            loss = loss + self.edge_weight * edge
        self.log_dict({"mse": mse, "kl": kl}, prog_bar=True)
        return loss


class SDModule(_EMAModule):
    """UNet + CLIP text encoder: epsilon prediction under the pipeline's DDPM noise schedule."""

    name = "tiny-sd"

    def __init__(self, pipe, stage: StageConfig, cfg: "ZooTrainConfig", shift: float, scale: float):
        adapter = get_adapter(pipe)  # what is trained, noising, prompt encoding and the denoiser call
        super().__init__(torch.nn.ModuleDict(trainable_nets(adapter, stage)), stage, cfg.caption_dropout, cfg.seed)
        self.pipe, self.shift, self.scale, self.min_snr_gamma = pipe, shift, scale, cfg.min_snr_gamma
        self.adapter = adapter

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ad, gen = self.adapter, self.generator()
        x0 = (batch["mean"] + batch["std"] * self.randn(batch["mean"].shape, gen) - self.shift) * self.scale
        noise = self.randn(x0.shape, gen)
        t = torch.randint(0, self.pipe.scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        captions = self.drop_captions(batch["caption"], gen)
        t = t.to(x0.device)
        xt = ad.add_noise(x0, noise, t)
        pred = ad.denoise(xt, t, ad.encode_prompts(captions, grad=self.stage.train_text))
        per = (pred - ad.training_target(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        if self.min_snr_gamma:  # Hang et al. 2023, epsilon target: weight min(SNR, gamma) / SNR
            abar = self.pipe.scheduler.alphas_cumprod.to(x0.device)[t]
            snr = abar / (1 - abar)
            per = per * torch.clamp(snr, max=self.min_snr_gamma) / snr
        loss = per.mean()
        self.log("loss", loss, prog_bar=True)
        return loss


def lr_factor(stage: StageConfig, warm: int, step: int) -> float:
    """The learning-rate multiplier at optimizer step ``step``: linear warm-up over ``warm`` steps, constant, and
    from ``stage.decay_from_step`` on a linear fall to 0 at ``stage.steps``. The decay changes no step before it,
    so it can be added to a run that has already passed the warm-up."""
    if stage.decay_from_step >= stage.steps:
        raise ValueError(f"decay_from_step ({stage.decay_from_step}) must be before steps ({stage.steps}): the "
                         "learning rate falls to 0 at steps")
    factor = min(1.0, (step + 1) / warm)
    if stage.decay_from_step and step >= stage.decay_from_step:
        factor *= max(0.0, (stage.steps - step) / max(1, stage.steps - stage.decay_from_step))
    return factor


def shift_times(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift: s -> k s / (1 + (k - 1) s); k > 1 moves noise levels towards pure noise (s = 1)."""
    return shift * s / (1 + (shift - 1) * s)


def flow_times(stage: StageConfig, step: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """The ``n`` noise levels s of a rectified-flow step: logit-normal (sigmoid of a standard normal, most weight
    mid-trajectory, as SD3 trains), or uniform in [0, 1] from ``stage.uniform_times_from_step`` on; shifted
    towards pure noise by ``stage.time_shift`` from ``stage.time_shift_from_step`` on."""
    if stage.uniform_times_from_step and step >= stage.uniform_times_from_step:
        s = torch.rand(n, generator=gen)
    else:
        s = torch.sigmoid(torch.randn(n, generator=gen))
    if stage.time_shift != 1.0 and step >= stage.time_shift_from_step:
        s = shift_times(s, stage.time_shift)
    return s


def flow_loss(module: "_EMAModule", batch: dict) -> torch.Tensor:
    """Rectified-flow loss of one batch (Flux, SD3): logit-normal times s, x_s = (1-s) x0 + s eps, velocity
    target eps - x0, compared in the denoiser's own (for Flux: packed) token layout. The adapter noises,
    encodes the captions and makes the call."""
    ad, gen = module.adapter, module.generator()
    x0 = (batch["mean"] + batch["std"] * module.randn(batch["mean"].shape, gen) - module.shift) * module.scale
    noise = module.randn(x0.shape, gen)
    s = flow_times(module.stage, module.global_step, x0.shape[0], gen).to(x0.device)
    xt = ad.add_noise(x0, noise, s)
    cond = ad.encode_prompts(module.drop_captions(batch["caption"], gen), grad=module.stage.train_text)
    v = ad.denoiser(**ad.denoiser_inputs(xt, s, cond), return_dict=False)[0]
    return F.mse_loss(v, ad.pack(ad.training_target(x0, noise)))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules hold the same tensors, up to a float16 round trip (shipped weights are float16)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.allclose(sa[k].half().float(), sb[k].half().float(), atol=1e-3, rtol=1e-2)
        for k in sa)


def init_weights(pipe, path: str | Path) -> None:
    """Load the trainable weights (denoiser, text encoders) of the pipeline in ``path`` into ``pipe`` (``init_from``),
    refusing another architecture or another VAE."""
    from ..zoo import load_pipeline

    src = load_pipeline(str(path), dtype="float32")
    if type(src) is not type(pipe) or not same_weights(src.vae, pipe.vae):
        raise ValueError(f"init_from {path}: needs a {type(pipe).__name__} on the same VAE as this run")
    for key, net in get_adapter(pipe).trainable().items():
        theirs = getattr(src, key).state_dict()
        try:
            net.load_state_dict({k: v.to(net.dtype) for k, v in theirs.items()}, strict=True)
        except RuntimeError as e:
            raise ValueError(f"init_from {path}: its {key} is another architecture than this config builds: {e}") from e


class EpsilonTeacher:
    """A trained DDPM epsilon model (tiny-sd) on the student's VAE, asked for the velocity target of a
    rectified-flow student (distillation).

    The student sees x_s = (1 - s) k (z - m) + s eps (its latent scale k and shift m); the teacher was trained on
    x_t = a_t K z + b_t eps (a_t^2 = alpha-bar_t, b_t^2 = 1 - a_t^2, its scale K, no shift). For the teacher's
    integer step t they are the same observation of z and eps when s = b_t k / (b_t k + a_t K), with
    x_t = (b_t / s) (x_s + (1 - s) k m). The teacher's eps-hat then gives z-hat = (x_t - b_t eps-hat) / (a_t K),
    and the student's target is eps-hat - k (z-hat - m), its own estimate of E[eps - x0 | x_s] instead of the one
    sampled (eps, x0) pair, a target of far lower variance at high noise, where the outline is decided. Noise
    levels outside the teacher's range (s above its t = 999 level, below its t = 0 level) are not expressible and
    keep the image target. Nothing of it is trained or saved; it is kept out of the module's parameters."""

    def __init__(self, path: str | Path, vae, device: str):
        from ..zoo import load_pipeline

        pipe = load_pipeline(str(path), device=device, dtype="float32")
        adapter, sched = get_adapter(pipe), pipe.scheduler.config
        if adapter.flow or sched.get("prediction_type") != "epsilon":
            raise ValueError(f"flux.teacher {path}: needs a DDPM pipeline with epsilon prediction (a trained "
                             f"tiny-sd), got {type(pipe).__name__} predicting {sched.get('prediction_type')!r}")
        if not same_weights(vae, pipe.vae):
            raise ValueError(f"flux.teacher {path}: its VAE is not the one tiny-flux trains on, so its predictions "
                             "are of other latents")
        self.pipe, self.adapter = pipe, adapter
        for net in adapter.trainable().values():
            net.eval().requires_grad_(False)
        abar = pipe.scheduler.alphas_cumprod.double()
        self.a, self.b, self.k = abar.sqrt(), (1 - abar).sqrt(), float(pipe.vae.config.scaling_factor)

    def levels(self, scale: float) -> torch.Tensor:
        """The student's noise level s of each teacher step t (increasing in t)."""
        return (self.b * scale / (self.b * scale + self.a * self.k)).float()

    def match(self, s: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(teacher step, its exact student level, inside the teacher's range) of each student level in ``s``."""
        lv = self.levels(scale)
        t = torch.searchsorted(lv, s.float().cpu()).clamp(1, len(lv) - 1)
        t = torch.where((s.cpu() - lv[t - 1]).abs() < (lv[t] - s.cpu()).abs(), t - 1, t)
        inside = (s.cpu() >= lv[0]) & (s.cpu() <= lv[-1])
        return t, lv[t], inside

    def _coefficients(self, t: torch.Tensor, scale: float, like: torch.Tensor):
        col = lambda v: v.float().to(like.device)[:, None, None, None]  # noqa: E731
        return col(self.a[t]), col(self.b[t]), col(self.levels(scale)[t])

    def teacher_input(self, xs: torch.Tensor, t: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
        """The teacher's x_t = a_t K z + b_t eps of the student inputs ``xs`` at its steps ``t``."""
        _, b, s = self._coefficients(t, scale, xs)
        return (b / s) * (xs + (1 - s) * scale * shift)

    def target(self, xt: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
        """The student's velocity eps - k (z - m) where z = (x_t - b_t eps) / (a_t K): with the true eps, the
        sampled velocity itself; with the teacher's eps-hat, its estimate."""
        a, b, _ = self._coefficients(t, scale, xt)
        z = (xt - b * eps) / (a * self.k)
        return eps - scale * (z - shift)

    @torch.no_grad()
    def velocity(self, xs: torch.Tensor, t: torch.Tensor, captions: list[str], shift: float, scale: float
                 ) -> torch.Tensor:
        """The teacher's velocity target eps-hat - x0-hat (student coordinates) of student inputs ``xs`` at the
        teacher steps ``t`` (levels ``levels(scale)[t]``)."""
        xt = self.teacher_input(xs, t, shift, scale)
        eps = self.adapter.denoise(xt, t.to(xs.device), self.adapter.encode_prompts(captions))
        return self.target(xt, eps, t, shift, scale)


def distill_loss(module: "FluxModule", batch: dict) -> torch.Tensor:
    """``flow_loss`` with the teacher's velocity as the target where it can give one (``EpsilonTeacher``); the
    same draws of latents, noise, times and captions as ``flow_loss``, the times moved to the nearest teacher
    level."""
    ad, gen, teacher = module.adapter, module.generator(), module.teacher()
    x0 = (batch["mean"] + batch["std"] * module.randn(batch["mean"].shape, gen) - module.shift) * module.scale
    noise = module.randn(x0.shape, gen)
    s = flow_times(module.stage, module.global_step, x0.shape[0], gen)
    t, exact, inside = teacher.match(s, module.scale)
    s = torch.where(inside, exact, s).to(x0.device)
    xt = ad.add_noise(x0, noise, s)
    captions = module.drop_captions(batch["caption"], gen)
    cond = ad.encode_prompts(captions, grad=module.stage.train_text)
    v = ad.denoiser(**ad.denoiser_inputs(xt, s, cond), return_dict=False)[0]
    target = ad.training_target(x0, noise)
    if inside.any():
        rows = inside.nonzero().flatten().tolist()
        target[rows] = teacher.velocity(xt[rows], t[rows], [captions[i] for i in rows], module.shift, module.scale)
    return F.mse_loss(v, ad.pack(target))


class FluxModule(_EMAModule):
    """Flux transformer + CLIP + T5: rectified flow, x_s = (1-s) x0 + s eps, velocity target eps - x0 (from
    ``flux.teacher_from_step`` on, with ``flux.teacher``: the teacher's estimate of it, ``distill_loss``)."""

    name = "tiny-flux"

    def __init__(self, pipe, stage: StageConfig, cfg: "ZooTrainConfig", shift: float, scale: float):
        adapter = get_adapter(pipe)
        super().__init__(torch.nn.ModuleDict(trainable_nets(adapter, stage)), stage, cfg.caption_dropout, cfg.seed)
        self.pipe, self.shift, self.scale, self.adapter = pipe, shift, scale, adapter
        self._teacher: list[EpsilonTeacher] = []  # a list: not a submodule, so never trained nor checkpointed

    def teacher(self) -> EpsilonTeacher:
        if not self._teacher:
            self._teacher.append(EpsilonTeacher(self.stage.teacher, self.pipe.vae, str(self.device)))
        return self._teacher[0]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.stage.teacher and self.global_step >= self.stage.teacher_from_step:
            loss = distill_loss(self, batch)
        else:
            loss = flow_loss(self, batch)
        self.log("loss", loss, prog_bar=True)
        return loss


class SD3Module(_EMAModule):
    """SD3 transformer + two CLIPs + T5: rectified flow as Flux (logit-normal times), timestep = 1000 s."""

    name = "tiny-sd3"

    def __init__(self, pipe, stage: StageConfig, cfg: "ZooTrainConfig", shift: float, scale: float):
        adapter = get_adapter(pipe)
        super().__init__(torch.nn.ModuleDict(trainable_nets(adapter, stage)), stage, cfg.caption_dropout, cfg.seed)
        self.pipe, self.shift, self.scale, self.adapter = pipe, shift, scale, adapter

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = flow_loss(self, batch)
        self.log("loss", loss, prog_bar=True)
        return loss


# ---------------------------------------------------------------- driver


class StepCheckpoints(Callback):
    """Atomic checkpoints every ``every`` steps and at the end of fitting; the ``minutes`` stop; a loss log line."""

    def __init__(self, path: Path, every: int, minutes: float, log_every: int):
        self.path, self.every, self.minutes, self.log_every = path, every, minutes, log_every
        self.t0, self.losses = time.monotonic(), []

    def save(self, trainer: L.Trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            trainer.save_checkpoint(tmp)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        self.losses.append(float(outputs["loss"]))
        if self.log_every and step % self.log_every == 0:
            rate = len(self.losses) / max(1e-9, time.monotonic() - self.t0)
            print(f"[{module.name}] step {step}/{trainer.max_steps} loss {np.mean(self.losses[-self.log_every:]):.4f} "
                  f"({rate:.2f} steps/s this process)", flush=True)
        if self.every and step % self.every == 0:
            self.save(trainer)
        if self.minutes and time.monotonic() - self.t0 > 60 * self.minutes and step < trainer.max_steps:
            print(f"[{module.name}] max_minutes reached at step {step}: stopping (resume continues)", flush=True)
            trainer.should_stop = True

    def on_train_end(self, trainer, module) -> None:
        self.save(trainer)


def checkpoint_dir(cfg: ZooTrainConfig) -> Path:
    return Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else workdir(cfg) / "checkpoints"


def stage_checkpoint(cfg: ZooTrainConfig, name: str) -> Path:
    """The resumable checkpoint of one stage (Lightning .ckpt: net, EMA, optimizer, scheduler, step). tiny-flux on
    its own VAE has its own file, named by that VAE (``tiny-flux-vae-f2-seed<seed>.ckpt``,
    ``tiny-flux-vae-f8c16-seed<seed>.ckpt``): its transformer can have the same shapes on either VAE, so a shared name
    would resume one run's weights on the other's latents."""
    if vae_of(cfg, name) != (4, 4):
        name = f"{name}-{vae_stage(*vae_of(cfg, name))}"
    return checkpoint_dir(cfg) / f"{name}-seed{cfg.seed}.ckpt"


def check_checkpoint_vae(module: _EMAModule, state: dict, ckpt: Path) -> None:
    """Refuse to resume a denoiser on another VAE than the one its checkpoint learned (e.g. the VAE was retrained
    with other settings): the shapes agree, so nothing else would notice, and the run would go on silently on
    latents it never saw. Checkpoints written before the fingerprint was stored carry none and are not checked."""
    saved = state.get(VAE_SHA_KEY)
    if saved and module.vae_sha and saved != module.vae_sha:
        raise ValueError(
            f"{ckpt} was trained on another VAE (weights {saved}) than the one in "
            f"{module.vae_dir} now (weights {module.vae_sha}). Restore that VAE, or move the checkpoint away "
            f"(or set checkpoint_dir / resume: false) to start {module.name} from step 0 on the new one.")


def check_checkpoint_fits(module: torch.nn.Module, saved: dict[str, torch.Tensor], ckpt: Path) -> None:
    """Refuse to resume from a checkpoint of another architecture (e.g. written before ``flux.heads`` changed),
    naming the first tensors that differ, instead of Lightning's long size-mismatch trace half-way into fit.
    ``saved``: the checkpoint's ``state_dict``."""
    own = module.state_dict()
    wrong = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in saved] + [k for k in saved if k not in own]
    if wrong or missing:
        raise ValueError(
            f"{ckpt} was written by another architecture than this config builds ({len(wrong)} tensors differ "
            f"in shape, {len(missing)} exist on one side only; first: {(wrong + missing)[:3]}). Move it away (or set "
            f"checkpoint_dir / resume: false) to start this run from step 0, or restore the config it was written with.")


def _fit(module: _EMAModule, data: Dataset, stage: StageConfig, cfg: ZooTrainConfig,
         second: tuple[int, ...] | None = None) -> tuple[torch.nn.ModuleDict, bool]:
    """Run Lightning up to ``stage.steps`` steps (from the stage checkpoint when ``cfg.resume``); ``second``:
    see ``StepBatches``.

    Returns the EMA weights and whether every step was run (False after a ``max_minutes`` stop).
    """
    ckpt = stage_checkpoint(cfg, module.name)
    start = 0
    if cfg.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        start = int(state["global_step"])
        check_checkpoint_vae(module, state, ckpt)
        check_checkpoint_fits(module, state.pop("state_dict"), ckpt)
        del state
    if start:
        print(f"[{module.name}] resuming from {ckpt} at step {start}", flush=True)
    saver = StepCheckpoints(ckpt, cfg.checkpoint_every, stage.max_minutes, cfg.log_every)
    trainer = L.Trainer(max_steps=stage.steps, max_epochs=-1, accelerator=cfg.device, devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[TQDMProgressBar(refresh_rate=10), saver], deterministic=True,
                        num_sanity_val_steps=0)
    trainer.fit(module, _loader(data, stage.batch_size, cfg.seed, start, second), ckpt_path=ckpt if start else None)
    return module.ema_net(), trainer.global_step >= stage.steps


def _save_atomic(obj, target: Path, cfg: ZooTrainConfig) -> Path:
    """``save_pretrained`` (plus the training config) into a temporary sibling folder, then rename it onto ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, folder=True) as tmp:
        obj.save_pretrained(tmp)
        (tmp / TRAIN_CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2))
    return target


def vae_stage(factor: int = 4, channels: int = 4) -> str:
    """The stage name of the VAE of downsampling ``factor`` and ``channels`` latent channels: ``vae`` (4, 4: the
    shared one), ``vae-f2`` (2, 4), ``vae-f8c16`` (8, 16)."""
    if (factor, channels) == (4, 4):
        return "vae"
    return f"vae-f{factor}" + (f"c{channels}" if channels != 4 else "")


def vae_of(cfg: ZooTrainConfig, name: str) -> tuple[int, int]:
    """(downsampling factor, latent channels) of the VAE stage ``name`` denoises in (tiny-flux: ``flux.vae_factor``
    and ``flux.vae_channels``; else the shared VAE's (4, 4))."""
    if name == "tiny-flux":
        return cfg.flux.vae_factor or 4, cfg.flux.vae_channels or 4
    return 4, 4


def train_vae(cfg: ZooTrainConfig, images: torch.Tensor, captions: list[str], factor: int = 4, channels: int = 4
              ) -> Path:
    """Train an AutoencoderKL of downsampling ``factor`` and ``channels`` latent channels (4, 4: the shared one;
    tiny-flux's own with ``flux.vae_factor`` / ``flux.vae_channels``) on the ``vae`` stage settings and save it
    (float32, scaling 1, shift 0) to ``vae_path(cfg, factor, channels)``. Returns at once when that VAE is trained
    and ``cfg.resume``.

    A run stopped by ``max_minutes`` keeps only its checkpoint (the denoisers need the finished VAE).
    """
    name, path = vae_stage(factor, channels), vae_path(cfg, factor, channels)
    if cfg.resume and (path / "config.json").exists():
        print(f"[{name}] resume: keeping the trained VAE in {path}", flush=True)
        return path
    L.seed_everything(cfg.seed, workers=True)
    module = VAEModule(build_vae(factor, channels), cfg.vae, cfg, factor, channels)
    ema, done = _fit(module, ImageCaptions(images, captions), cfg.vae, cfg)
    if not done:
        raise SystemExit(f"{name} stopped by max_minutes before {cfg.vae.steps} steps; run again with --resume true")
    return _save_atomic(ema["vae"].float().cpu(), path, cfg)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: str, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every cached image under ``vae``."""
    vae = vae.to(device).eval()
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="encode latents"):
        post = vae.encode(images[i:i + batch_size].to(device).float() / 127.5 - 1).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


def cached_latents(cfg: ZooTrainConfig, vae, images: torch.Tensor, multi: bool = False, factor: int = 4,
                   channels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_latents`` of the cached images (``multi``: of the second set) under the trained VAE of
    ``factor`` and ``channels``, computed once per trained VAE and kept beside it."""
    sha = vae_fingerprint(cfg, factor, channels)
    path = workdir(cfg) / f"latents-{data_key(cfg, multi)}-vae{sha}.pt"  # new VAE, new cache
    if path.exists():
        blob = torch.load(path)
        return blob["mean"], blob["std"]
    mean, std = encode_latents(vae, images, cfg.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"mean": mean, "std": std}, tmp)
    return mean, std


def vae_path(cfg: ZooTrainConfig, factor: int = 4, channels: int = 4) -> Path:
    return checkpoint_dir(cfg) / f"{vae_stage(factor, channels)}-seed{cfg.seed}"


def vae_fingerprint(cfg: ZooTrainConfig, factor: int = 4, channels: int = 4) -> str:
    """12 hex digits of the SHA-256 of the trained VAE's weight files: names its latent cache, and is stored in
    every denoiser checkpoint so that a resume on a retrained VAE is refused (``check_checkpoint_vae``)."""
    files = sorted(vae_path(cfg, factor, channels).glob("*.safetensors"))
    weights = hashlib.sha256(b"".join(p.read_bytes() for p in files))
    return weights.hexdigest()[:12]


def _trained_vae(cfg: ZooTrainConfig, factor: int = 4, channels: int = 4):
    from diffusers import AutoencoderKL

    path = vae_path(cfg, factor, channels)
    if not (path / "config.json").exists():
        how = "--model vae (or --model all)" if (factor, channels) == (4, 4) else \
            "--model tiny-flux (it trains its VAE first)"
        raise FileNotFoundError(f"no trained VAE in {path}; train it first with {how}")
    return AutoencoderKL.from_pretrained(path)


def _assemble(name: str, cfg: ZooTrainConfig, images: torch.Tensor):
    """The untrained pipeline of ``name`` on the trained VAE (scaling / shift factors set from its latents):
    (pipe, module class, stage config, shift, scale, (latent means, stds))."""
    factor, channels = vae_of(cfg, name)
    vae = _trained_vae(cfg, factor, channels)
    mean, std = cached_latents(cfg, vae, images, factor=factor, channels=channels)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(cfg.seed))
    shift = float(z.mean()) if name in ("tiny-flux", "tiny-sd3") else 0.0
    scale = float(1.0 / (z - shift).std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    L.seed_everything(cfg.seed, workers=True)
    build, module_cls, stage = {"tiny-sd": (build_tiny_sd, SDModule, cfg.sd),
                                "tiny-flux": (build_tiny_flux, FluxModule, cfg.flux),
                                "tiny-sd3": (build_tiny_sd3, SD3Module, cfg.sd3)}[name]
    kw = ({"heads": stage.heads} if stage.heads else {}) | ({"vae_factor": factor} if factor != 4 else {})
    kw |= ({"vae_channels": channels} if channels != 4 else {}) | ({"head_dim": stage.head_dim} if stage.head_dim else {})
    kw |= ({"layers": stage.layers} if stage.layers else {}) | (
        {"single_layers": stage.single_layers} if stage.single_layers >= 0 else {})
    pipe = build(cfg.seed, **kw)  # built around a VAE of the same factor: the pipeline's vae_scale_factor
    if stage.adaln_zero:
        zero_init_modulation(get_adapter(pipe).denoiser)
    if not stage.pooled_text:
        drop_pooled_text(get_adapter(pipe).denoiser)
    if stage.qk_scale != 1.0:
        scale_qk_norms(get_adapter(pipe).denoiser, stage.qk_scale)
    pipe.register_modules(vae=vae.cpu())
    return pipe, module_cls, stage, shift, scale, (mean, std)


def pipeline_from_checkpoint(name: str, cfg: ZooTrainConfig, ckpt: str | Path | None = None):
    """The pipeline of ``name`` with the EMA weights of a training checkpoint (default: this config's
    resumable checkpoint of that stage), float32, eval mode: for judging a run before it finishes."""
    images, _ = render_cache(cfg)
    pipe, _, _, _, _, _ = _assemble(name, cfg, images)
    ckpt = Path(ckpt) if ckpt else stage_checkpoint(cfg, name)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    prefix = "ema.module."
    ema = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    nets = torch.nn.ModuleDict({key: getattr(pipe, key) for key in {k.split(".")[0] for k in ema}})
    nets.load_state_dict(ema, strict=True)
    for net in nets.values():
        net.eval()
    return pipe, int(state["global_step"])


def train_denoiser(name: str, cfg: ZooTrainConfig, images: torch.Tensor, captions: list[str]) -> Path:
    """Train ``tiny-sd`` or ``tiny-flux`` on the trained VAE's latents and save the whole pipeline to ``out/name``.

    The VAE's scaling factor is 1/std of its latents; the Flux copy also gets the latent mean as shift factor.
    """
    pipe, module_cls, stage, shift, scale, (mean, std) = _assemble(name, cfg, images)
    if stage.init_from and not (cfg.resume and stage_checkpoint(cfg, name).exists()):
        print(f"[{name}] starting from the weights of {stage.init_from}", flush=True)
        init_weights(pipe, stage.init_from)
        if not stage.pooled_text:
            drop_pooled_text(get_adapter(pipe).denoiser)
    module = module_cls(pipe, stage, cfg, shift, scale)
    factor, channels = vae_of(cfg, name)
    module.vae_sha, module.vae_dir = vae_fingerprint(cfg, factor, channels), vae_path(cfg, factor, channels)
    second = None
    if stage.multi_origin_step > stage.multi_from_step:
        raise ValueError(f"{name}: multi_origin_step ({stage.multi_origin_step}) must not be after multi_from_step")
    if 0 < stage.multi_from_step < stage.steps:  # the curriculum's second set, appended (its own latents)
        images2, captions2 = render_cache(cfg, multi=True)
        mean2, std2 = cached_latents(cfg, pipe.vae, images2, multi=True, factor=factor, channels=channels)
        mean, std, captions = torch.cat([mean, mean2]), torch.cat([std, std2]), list(captions) + list(captions2)
        second = (stage.multi_from_step, len(captions2), stage.multi_origin_step or stage.multi_from_step)
    ema, done = _fit(module, LatentCaptions(mean, std, captions), stage, cfg, second)
    if not done:
        print(f"[{name}] stopped early: saving the EMA weights so far to {Path(cfg.out) / name}", flush=True)
    pipe.register_modules(**{key: copy.deepcopy(net).cpu().eval() for key, net in ema.items()})
    pipe.to(dtype=resolve_dtype(cfg.save_dtype))
    return _save_atomic(pipe, Path(cfg.out) / name, cfg)


STAGE_KEYS = {"tiny-sd": "sd", "tiny-flux": "flux", "tiny-sd3": "sd3"}


def export_checkpoint(cfg: ZooTrainConfig, ckpt: str | Path) -> Path:
    """Save the EMA weights of the training checkpoint ``ckpt`` of ``cfg.model`` as its pipeline in ``out/<model>``
    (``save_dtype``, atomically), with ``cfg`` at the checkpoint's step as the saved training config."""
    if cfg.model not in STAGE_KEYS:
        raise ValueError(f"export_checkpoint: model must be one of {sorted(STAGE_KEYS)}, got {cfg.model!r}")
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"export_checkpoint: no checkpoint file {ckpt}")
    pipe, step = pipeline_from_checkpoint(cfg.model, cfg, ckpt)
    pipe.to(dtype=resolve_dtype(cfg.save_dtype))
    saved = copy.deepcopy(cfg)
    getattr(saved, STAGE_KEYS[cfg.model]).steps = step
    target = _save_atomic(pipe, Path(cfg.out) / cfg.model, saved)
    print(f"[{cfg.model}] exported {ckpt} (step {step}) -> {target}", flush=True)
    return target


def train_zoo(cfg: ZooTrainConfig) -> dict[str, Path]:
    """Train what ``cfg.model`` names (``all``: the VAE, then both denoisers) and return the saved folders
    (with ``export_checkpoint``: only save that checkpoint's pipeline)."""
    check_config(cfg)
    if cfg.export_checkpoint:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return {cfg.model: export_checkpoint(cfg, cfg.export_checkpoint)}
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    images, captions = render_cache(cfg)
    names = ALL_STAGES if cfg.model == "all" else [cfg.model]
    out: dict[str, Path] = {}
    for name in names:
        if name != "vae" and vae_of(cfg, name) != (4, 4):  # its own VAE first (at once when trained)
            train_vae(cfg, images, captions, *vae_of(cfg, name))
        out[name] = train_vae(cfg, images, captions) if name == "vae" else train_denoiser(name, cfg, images, captions)
        print(f"saved {name} -> {out[name]}")
    return out
