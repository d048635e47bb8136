"""Train the zoo's tiny text-to-image models on the ``shapes`` world (``revelio zoo train``).

Order: a tiny AutoencoderKL first (64x64 RGB -> 4x16x16 latents), then ``tiny-sd`` (UNet,
epsilon prediction on the DDPM schedule) and ``tiny-flux`` (MM-DiT, rectified flow) on its
latents. Both denoisers are trained jointly with their small text encoders, with ~10% of
captions dropped to "" so classifier-free guidance works. The architectures are the zoo
builders' (``builders.py``); the pipelines' own ``encode_prompt`` encodes captions, so
training and generation see identical conditioning. Everything is seeded: the same config
gives the same weights. Shapes images are rendered once into a tensor cache.

Colour x shape pairs listed in ``holdout`` never appear in any training image, so the
quality benchmark can test generalisation to unseen combinations.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from extraction.files import make_tmp

from ..config import to_dict
from ..datasets.shapes import Shapes
from . import cache_dir, resolve_dtype
from .builders import IMAGE_SIZE, MAX_TOKENS, build_tiny_flux, build_tiny_sd, build_vae
from .config import DEFAULT_HOLDOUT, STAGES, TRAIN_CONFIG_FILE, StageConfig, ZooTrainConfig  # noqa: F401 (re-exported)


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
    resolve_dtype(cfg.save_dtype)


# ---------------------------------------------------------------- data


def workdir(cfg: ZooTrainConfig) -> Path:
    """Where the rendered images and the intermediate VAE live."""
    return Path(cfg.workdir) if cfg.workdir else cache_dir() / "zoo-train"


def data_key(cfg: ZooTrainConfig) -> str:
    """A name that changes whenever the rendered training images would."""
    hold = "_".join(sorted(cfg.holdout)).replace(" ", "-")
    return f"shapes{IMAGE_SIZE}-n{cfg.images}-single{cfg.single_fraction}-seed{cfg.seed}-hold{hold}"


def render_cache(cfg: ZooTrainConfig) -> tuple[torch.Tensor, list[str]]:
    """The training images (N, 3, 64, 64) uint8 and captions, rendered once and cached on disk.

    Single-object and 1-3-object images come from two seed streams of the shapes world;
    any image containing a held-out pair is skipped.
    """
    root = workdir(cfg)
    path = root / f"{data_key(cfg)}.pt"
    if path.exists():
        blob = torch.load(path)
        return blob["images"], blob["captions"]
    n_single = round(cfg.images * cfg.single_fraction)
    streams = [(Shapes(IMAGE_SIZE, count=10**9, seed=cfg.seed, max_objects=1), n_single),
               (Shapes(IMAGE_SIZE, count=10**9, seed=cfg.seed + 1, max_objects=3), cfg.images - n_single)]
    images = torch.empty(cfg.images, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    captions: list[str] = []
    with tqdm(total=cfg.images, desc="render shapes") as bar:
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
    tmp = path.with_suffix(".tmp")
    torch.save({"images": images, "captions": captions}, tmp)
    os.replace(tmp, path)
    return images, captions


class ImageCaptions(Dataset):
    """Cached images as floats in [-1, 1] (random horizontal flip, random ``crop`` x ``crop`` window) with captions."""

    def __init__(self, images: torch.Tensor, captions: list[str], crop: int = IMAGE_SIZE, flip: bool = True):
        self.images, self.captions, self.crop, self.flip = images, captions, crop, flip

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        x = self.images[i].float() / 127.5 - 1
        if self.crop < x.shape[-1]:
            y0, x0 = torch.randint(0, x.shape[-1] - self.crop + 1, (2,)).tolist()
            x = x[:, y0:y0 + self.crop, x0:x0 + self.crop]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"pixels": x, "caption": self.captions[i]}


class LatentCaptions(Dataset):
    """VAE posterior (mean, std) per image: each access draws a fresh latent sample, scaled for the denoiser."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, captions: list[str], shift: float, scale: float):
        self.mean, self.std, self.captions, self.shift, self.scale = mean, std, captions, shift, scale

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        z = self.mean[i] + self.std[i] * torch.randn_like(self.mean[i])
        return {"latents": (z - self.shift) * self.scale, "caption": self.captions[i]}


def _loader(ds: Dataset, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- Lightning modules


class _EMAModule(L.LightningModule):
    """Shared training plumbing: AdamW with warm-up on ``self.net``, an EMA copy, dropped captions."""

    def __init__(self, net: torch.nn.ModuleDict, stage: StageConfig, caption_dropout: float = 0.0):
        super().__init__()
        self.net, self.stage, self.caption_dropout = net, stage, caption_dropout
        self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(stage.ema_decay), use_buffers=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.stage.lr, weight_decay=0.0)
        warm = max(1, self.stage.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update_parameters(self.net)

    def drop_captions(self, captions: list[str]) -> list[str]:
        keep = torch.rand(len(captions)) >= self.caption_dropout
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    def ema_net(self) -> torch.nn.ModuleDict:
        return self.ema.module


class VAEModule(_EMAModule):
    """AutoencoderKL: per-pixel MSE plus a small KL to a unit Gaussian (a smooth latent space to diffuse in)."""

    def __init__(self, vae, stage: StageConfig, kl_weight: float):
        super().__init__(torch.nn.ModuleDict({"vae": vae}), stage)
        self.kl_weight = kl_weight

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        vae = self.net["vae"]
        post = vae.encode(batch["pixels"]).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, batch["pixels"])
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = mse + self.kl_weight * kl
        self.log_dict({"mse": mse, "kl": kl}, prog_bar=True)
        return loss


class SDModule(_EMAModule):
    """UNet + CLIP text encoder: epsilon prediction under the pipeline's DDPM noise schedule."""

    def __init__(self, pipe, stage: StageConfig, caption_dropout: float):
        super().__init__(torch.nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder}), stage,
                         caption_dropout)
        self.pipe = pipe

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = batch["latents"]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.pipe.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = self.pipe.scheduler.add_noise(x0, noise, t)
        emb = self.pipe.encode_prompt(self.drop_captions(batch["caption"]), x0.device, 1, False)[0]
        pred = self.net["unet"](xt, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, noise)
        self.log("loss", loss, prog_bar=True)
        return loss


class FluxModule(_EMAModule):
    """Flux transformer + CLIP + T5: rectified flow, x_s = (1-s) x0 + s eps, velocity target eps - x0."""

    def __init__(self, pipe, stage: StageConfig, caption_dropout: float):
        net = torch.nn.ModuleDict({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
                                   "text_encoder_2": pipe.text_encoder_2})
        super().__init__(net, stage, caption_dropout)
        self.pipe = pipe

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = batch["latents"]
        b, c, h, w = x0.shape
        noise = torch.randn_like(x0)
        s = torch.sigmoid(torch.randn(b, device=x0.device))  # logit-normal times: most weight mid-trajectory
        xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        prompt, pooled, text_ids = self.pipe.encode_prompt(self.drop_captions(batch["caption"]), device=x0.device,
                                                           max_sequence_length=MAX_TOKENS)
        pack = self.pipe._pack_latents
        v = self.net["transformer"](
            hidden_states=pack(xt, b, c, h, w), timestep=s, pooled_projections=pooled, encoder_hidden_states=prompt,
            txt_ids=text_ids, img_ids=self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype),
            return_dict=False)[0]
        loss = F.mse_loss(v, pack(noise - x0, b, c, h, w))
        self.log("loss", loss, prog_bar=True)
        return loss


# ---------------------------------------------------------------- driver


def _fit(module: _EMAModule, loader: DataLoader, stage: StageConfig, device: str) -> torch.nn.ModuleDict:
    """Run Lightning for ``stage.steps`` steps and return the EMA weights."""
    trainer = L.Trainer(max_steps=stage.steps, max_epochs=-1, accelerator=device, devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[TQDMProgressBar(refresh_rate=10)],
                        log_every_n_steps=25, deterministic=True,
                        max_time={"minutes": stage.max_minutes} if stage.max_minutes else None)
    trainer.fit(module, loader)
    return module.ema_net()


def _save_atomic(obj, target: Path, cfg: ZooTrainConfig) -> Path:
    """``save_pretrained`` (plus the training config) into a temporary sibling folder, then rename it onto ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tmp(target, folder=True)
    try:
        obj.save_pretrained(tmp)
        (tmp / TRAIN_CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def train_vae(cfg: ZooTrainConfig, images: torch.Tensor, captions: list[str]) -> Path:
    """Train the shared AutoencoderKL and save it (float32, scaling 1, shift 0) to ``workdir/vae-seed<seed>``."""
    L.seed_everything(cfg.seed, workers=True)
    module = VAEModule(build_vae(), cfg.vae, cfg.kl_weight)
    ema = _fit(module, _loader(ImageCaptions(images, captions, crop=cfg.vae_crop), cfg.vae.batch_size, cfg.seed), cfg.vae, cfg.device)
    return _save_atomic(ema["vae"].float().cpu(), vae_path(cfg), cfg)


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


def cached_latents(cfg: ZooTrainConfig, vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_latents`` of the cached images, computed once per trained VAE and kept beside it."""
    path = vae_path(cfg) / f"latents-{data_key(cfg)}.pt"  # retraining the VAE replaces its folder, and this cache
    if path.exists():
        blob = torch.load(path)
        return blob["mean"], blob["std"]
    mean, std = encode_latents(vae, images, cfg.device)
    tmp = path.with_suffix(".tmp")
    torch.save({"mean": mean, "std": std}, tmp)
    os.replace(tmp, path)
    return mean, std


def vae_path(cfg: ZooTrainConfig) -> Path:
    return workdir(cfg) / f"vae-seed{cfg.seed}"


def _trained_vae(cfg: ZooTrainConfig):
    from diffusers import AutoencoderKL

    path = vae_path(cfg)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no trained VAE in {path}; train it first with --model vae (or --model all)")
    return AutoencoderKL.from_pretrained(path)


def train_denoiser(name: str, cfg: ZooTrainConfig, images: torch.Tensor, captions: list[str]) -> Path:
    """Train ``tiny-sd`` or ``tiny-flux`` on the trained VAE's latents and save the whole pipeline to ``out/name``.

    The VAE's scaling factor is 1/std of its latents; the Flux copy also gets the latent mean as shift factor.
    """
    vae = _trained_vae(cfg)
    mean, std = cached_latents(cfg, vae, images)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(cfg.seed))
    shift = float(z.mean()) if name == "tiny-flux" else 0.0
    scale = float(1.0 / (z - shift).std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    L.seed_everything(cfg.seed, workers=True)
    build, module_cls, stage = {"tiny-sd": (build_tiny_sd, SDModule, cfg.sd),
                                "tiny-flux": (build_tiny_flux, FluxModule, cfg.flux)}[name]
    pipe = build(cfg.seed)
    pipe.register_modules(vae=vae.cpu())
    module = module_cls(pipe, stage, cfg.caption_dropout)
    data = LatentCaptions(mean, std, captions, shift, scale)
    ema = _fit(module, _loader(data, stage.batch_size, cfg.seed), stage, cfg.device)
    pipe.register_modules(**{key: copy.deepcopy(net).cpu().eval() for key, net in ema.items()})
    pipe.to(dtype=resolve_dtype(cfg.save_dtype))
    return _save_atomic(pipe, Path(cfg.out) / name, cfg)


def train_zoo(cfg: ZooTrainConfig) -> dict[str, Path]:
    """Train what ``cfg.model`` names (``all``: the VAE, then both denoisers) and return the saved folders."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    images, captions = render_cache(cfg)
    names = STAGES if cfg.model == "all" else [cfg.model]
    out: dict[str, Path] = {}
    for name in names:
        out[name] = train_vae(cfg, images, captions) if name == "vae" else train_denoiser(name, cfg, images, captions)
        print(f"saved {name} -> {out[name]}")
    return out
