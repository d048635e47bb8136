"""One adapter per architecture family: everything model-specific about a forward pass on a real image.

The extraction loop (and saliency's real-image path) never branches on the model: it asks the
adapter to encode images to latents, noise them to timestep ``t``, encode prompts and run ONE
denoiser call, and which part of a hooked module's output is the image (spatial) part.

* ``UNetAdapter``  - SD 1.x / 2.x / SDXL (``pipe.unet``), maps are (B, C, H, W).
* ``MMDiTAdapter`` - SD3 and Flux (``pipe.transformer``, double/joint blocks return
  ``(text, image)`` tuples), image tokens (B, T, C).
* ``DiTAdapter``   - PixArt (T5 text) and DiT (class labels), image tokens (B, T, C).
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps


def sample_seed(seed: int, sample_id: str, t: int) -> int:
    """A 63-bit seed from (run seed, image id, timestep): noise independent of batch and rank."""
    digest = hashlib.sha256(f"{seed}/{sample_id}/{t}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_generators(seed: int, ids: Sequence[str], t: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded by ``sample_seed`` (diffusers' per-sample generator list)."""
    return [torch.Generator("cpu").manual_seed(sample_seed(seed, i, t)) for i in ids]


def draw_noise(shape: Sequence[int], generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise of ``shape`` (CPU, float32); a list of generators draws one row each."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    return torch.randn(tuple(shape), generator=generator)


def close_match_error(kind: str, name: str, valid: Sequence[str], headline: Sequence[str] | None = None) -> KeyError:
    """A KeyError naming ``name``'s close matches first, then the valid choices."""
    close = difflib.get_close_matches(name, list(valid), n=5, cutoff=0.5)
    shown = list(headline) if headline is not None else list(valid)
    more = f" (+{len(valid) - len(shown)} finer module paths, as in print(model))" if len(valid) > len(shown) else ""
    msg = f"unknown {kind} {name!r}"
    if close:
        msg += f"; close matches: {', '.join(close)}"
    return KeyError(f"{msg}; valid: {', '.join(shown)}{more}")


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"hooked module returned {type(out).__name__}, which holds no tensor to capture")


class Adapter:
    """Base class; subclasses fill in the family-specific parts."""

    family: str = ""
    flow: bool = False

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.denoiser: torch.nn.Module = self._denoiser(pipe)
        self.vae = pipe.vae
        self._ddpm = None
        if not self.flow:
            from diffusers import DDPMScheduler

            # The paper's x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, whatever sampler the pipeline ships.
            self._ddpm = DDPMScheduler.from_config(pipe.scheduler.config)

    @staticmethod
    def _denoiser(pipe: Any) -> torch.nn.Module:
        return pipe.transformer

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # --- images -> latents -------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image], size: int) -> torch.Tensor:
        """Resize the short side + centre crop to ``size``, RGB, to a (B, 3, H, W) tensor in [-1, 1]."""
        arrs = []
        for img in images:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = ImageOps.fit(img, (size, size), Image.BICUBIC)
            arrs.append(np.asarray(img, dtype=np.float32))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
        return x / 127.5 - 1.0

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents: mode of the latent distribution, then ``(z - shift) * scale`` (shift 0 for SD/PixArt/DiT)."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).to(self.dtype)

    def noise(self, latents: torch.Tensor, t: int, generator: torch.Generator | list[torch.Generator] | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise clean latents to integer timestep ``t`` in [0, 1000): DDPM ``add_noise`` or flow interpolation."""
        if not 0 <= int(t) < 1000:
            raise ValueError(f"timestep {t} is outside [0, 1000)")
        eps = draw_noise(latents.shape, generator) if noise is None else noise
        eps = eps.to(latents.device, torch.float32)
        x0 = latents.float()
        if self.flow:
            s = t / 1000.0
            xt = (1.0 - s) * x0 + s * eps
        else:
            ts = torch.full((x0.shape[0],), int(t), dtype=torch.long)
            xt = self._ddpm.add_noise(x0, eps, ts.to(x0.device))
        return xt.to(latents.dtype)

    # --- conditioning and one forward -------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, noisy: torch.Tensor, t: int, cond: dict[str, Any]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # --- hooks ------------------------------------------------------------------------------------------------
    def hook_names(self) -> list[str]:
        """Every named submodule of the denoiser: the paths ``print(model)`` shows."""
        return [n for n, _ in self.denoiser.named_modules() if n]

    def block_names(self) -> list[str]:
        """The coarse hook points (block level) shown first in error messages."""
        return [n for n in self.hook_names() if n.count(".") <= 1 and n.split(".")[0].endswith(("blocks", "block"))]

    def check_hooks(self, hooks: Sequence[str]) -> None:
        """Fail before any work when a hook name is not a module of the denoiser."""
        if not hooks:
            raise ValueError(f"no hooks given; valid: {', '.join(self.block_names())}")
        valid = set(self.hook_names())
        for h in hooks:
            if h not in valid:
                raise close_match_error("hook", h, self.hook_names(), self.block_names())

    def image_grid(self, latents: torch.Tensor) -> tuple[int, int]:
        """(h, w) of the image-token grid (DiTs) or of the latent map (UNets)."""
        return int(latents.shape[-2]), int(latents.shape[-1])

    def n_image_tokens(self, latents: torch.Tensor) -> int | None:
        """Image tokens per sample in the denoiser's sequence (None for UNets, whose maps are not sequences)."""
        h, w = self.image_grid(latents)
        return h * w

    def image_part(self, out: Any, n_img: int | None) -> torch.Tensor:
        """The image-spatial tensor in a hooked module's output (or input)."""
        x = _first_tensor(out)
        if n_img is not None and x.ndim == 3 and x.shape[1] > n_img:
            x = x[:, -n_img:]  # text+image concatenated (image tokens come last)
        return x

    def hook_input(self, args: tuple, kwargs: dict[str, Any], n_img: int | None) -> torch.Tensor:
        """The image-spatial input of a hooked module (``hidden_states`` / ``sample`` or the first argument)."""
        for key in ("hidden_states", "sample", "input"):
            if isinstance(kwargs.get(key), torch.Tensor):
                return self.image_part(kwargs[key], n_img)
        if args and isinstance(args[0], torch.Tensor):
            return self.image_part(args[0], n_img)
        raise TypeError("hooked module got no tensor input to capture")


class UNetAdapter(Adapter):
    """SD 1.x / 2.x (text cross-attention) and SDXL (+ pooled text embeddings and time ids)."""

    family = "unet"
    flow = False

    @staticmethod
    def _denoiser(pipe: Any) -> torch.nn.Module:
        return pipe.unet

    def n_image_tokens(self, latents: torch.Tensor) -> int | None:
        return None

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.denoiser.config, "addition_embed_type", None) == "text_time"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        if self.is_sdxl:
            emb, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False)
            return {"encoder_hidden_states": emb.to(self.dtype), "text_embeds": pooled.to(self.dtype)}
        emb, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"encoder_hidden_states": emb.to(self.dtype)}

    @torch.no_grad()
    def forward(self, noisy: torch.Tensor, t: int, cond: dict[str, Any]) -> torch.Tensor:
        b = noisy.shape[0]
        kw: dict[str, Any] = {}
        if self.is_sdxl:
            size = (noisy.shape[-2] * self.pipe.vae_scale_factor, noisy.shape[-1] * self.pipe.vae_scale_factor)
            proj = self.pipe.text_encoder_2.config.projection_dim if self.pipe.text_encoder_2 is not None \
                else int(cond["text_embeds"].shape[-1])
            ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=self.dtype, text_encoder_projection_dim=proj)
            kw["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": ids.to(self.device).repeat(b, 1)}
        ts = torch.full((b,), int(t), dtype=torch.long, device=self.device)
        return self.denoiser(noisy, ts, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False,
                             **kw)[0]

    def block_names(self) -> list[str]:
        return [n for n in self.hook_names()
                if n == "mid_block" or (n.count(".") == 1 and n.startswith(("down_blocks", "up_blocks")))]


class MMDiTAdapter(Adapter):
    """SD3 (joint blocks) and Flux (double-stream + single-stream blocks); rectified flow."""

    family = "mmdit"
    flow = True

    @property
    def is_flux(self) -> bool:
        return hasattr(self.denoiser, "single_transformer_blocks")

    def _max_len(self, tokenizer: Any, default: int) -> int:
        n = getattr(tokenizer, "model_max_length", default) if tokenizer is not None else default
        return int(min(default, n)) if n else default

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        if self.is_flux:
            emb, pooled, txt_ids = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
                max_sequence_length=self._max_len(self.pipe.tokenizer_2, 512))
            return {"encoder_hidden_states": emb.to(self.dtype), "pooled_projections": pooled.to(self.dtype),
                    "txt_ids": txt_ids}
        emb, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self._max_len(self.pipe.tokenizer_3, 256))
        return {"encoder_hidden_states": emb.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def patch(self) -> int:
        return 2 if self.is_flux else int(self.denoiser.config.patch_size)

    def image_grid(self, latents: torch.Tensor) -> tuple[int, int]:
        p = self.patch()
        return int(latents.shape[-2]) // p, int(latents.shape[-1]) // p

    @torch.no_grad()
    def forward(self, noisy: torch.Tensor, t: int, cond: dict[str, Any]) -> torch.Tensor:
        b, c, h, w = noisy.shape
        s = torch.full((b,), t / 1000.0, dtype=self.dtype, device=self.device)
        if not self.is_flux:
            return self.denoiser(hidden_states=noisy, timestep=s * 1000.0, return_dict=False,
                                 encoder_hidden_states=cond["encoder_hidden_states"],
                                 pooled_projections=cond["pooled_projections"])[0]
        packed = self.pipe._pack_latents(noisy, b, c, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype)
        guidance = torch.full((b,), 3.5, dtype=self.dtype, device=self.device) \
            if self.denoiser.config.guidance_embeds else None
        out = self.denoiser(hidden_states=packed, timestep=s, guidance=guidance, return_dict=False,
                            encoder_hidden_states=cond["encoder_hidden_states"],
                            pooled_projections=cond["pooled_projections"], txt_ids=cond["txt_ids"], img_ids=img_ids)[0]
        f = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(out, h * f, w * f, f)

    def image_part(self, out: Any, n_img: int | None) -> torch.Tensor:
        # Double-stream / joint blocks return (text stream, image stream): keep the image stream.
        if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], torch.Tensor):
            out = out[1]
        return super().image_part(out, n_img)

    def block_names(self) -> list[str]:
        return [n for n in self.hook_names() if n.count(".") == 1
                and n.startswith(("transformer_blocks", "single_transformer_blocks"))]


class DiTAdapter(Adapter):
    """Single-stream DiTs: PixArt (T5 cross-attention) and DiT (class-conditional, ImageNet labels)."""

    family = "dit"
    flow = False

    @property
    def is_class_conditional(self) -> bool:
        """DiT (class labels) rather than PixArt (T5 captions, ``caption_channels``)."""
        return getattr(self.denoiser.config, "caption_channels", None) is None

    def patch(self) -> int:
        return int(self.denoiser.config.patch_size)

    def image_grid(self, latents: torch.Tensor) -> tuple[int, int]:
        p = self.patch()
        return int(latents.shape[-2]) // p, int(latents.shape[-1]) // p

    def class_ids(self, prompts: list[str]) -> torch.Tensor:
        """DiT prompts are class ids ("207"), ImageNet label words, or "" for the null (unconditional) class."""
        n_cls = int(self.denoiser.config.num_embeds_ada_norm)
        names = {k.strip().lower(): int(v) for k, v in (getattr(self.pipe, "labels", None) or {}).items()}
        ids = []
        for p in prompts:
            key = p.strip().lower()
            if key == "":
                ids.append(n_cls)
            elif key.lstrip("-").isdigit() and 0 <= int(key) < n_cls:
                ids.append(int(key))
            elif key in names:
                ids.append(names[key])
            else:
                raise ValueError(f"DiT is class-conditional: prompt {p!r} is neither a class id in [0, {n_cls}), a "
                                 f"label name of pipe.labels, nor '' (null class). Use prompt mode 'empty' or a "
                                 f"template like '{{label_id}}'.")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        if self.is_class_conditional:
            return {"class_labels": self.class_ids(prompts)}
        emb, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                                  num_images_per_prompt=1, clean_caption=False,
                                                  max_sequence_length=self._t5_len())
        return {"encoder_hidden_states": emb.to(self.dtype), "encoder_attention_mask": mask}

    def _t5_len(self) -> int:
        n = getattr(self.pipe.tokenizer, "model_max_length", 120) or 120
        return int(min(120, n))

    @torch.no_grad()
    def forward(self, noisy: torch.Tensor, t: int, cond: dict[str, Any]) -> torch.Tensor:
        b = noisy.shape[0]
        ts = torch.full((b,), int(t), dtype=torch.long, device=self.device)
        if self.is_class_conditional:
            return self.denoiser(noisy, timestep=ts, class_labels=cond["class_labels"], return_dict=False)[0]
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(self.denoiser, "use_additional_conditions", False):
            size = float(noisy.shape[-1] * self.pipe.vae_scale_factor)
            added = {"resolution": torch.tensor([[size, size]] * b, dtype=self.dtype, device=self.device),
                     "aspect_ratio": torch.ones((b, 1), dtype=self.dtype, device=self.device)}
        return self.denoiser(noisy, encoder_hidden_states=cond["encoder_hidden_states"], timestep=ts,
                             encoder_attention_mask=cond["encoder_attention_mask"], added_cond_kwargs=added,
                             return_dict=False)[0]

    def block_names(self) -> list[str]:
        return [n for n in self.hook_names() if n.count(".") == 1 and n.startswith("transformer_blocks")]


def get_adapter(pipe: Any) -> Adapter:
    """The adapter for ``pipe``'s architecture family; a clear error for unsupported pipelines."""
    den = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    name = type(den).__name__ if den is not None else "none"
    if name == "UNet2DConditionModel":
        return UNetAdapter(pipe)
    if name in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
        return MMDiTAdapter(pipe)
    if name in ("PixArtTransformer2DModel", "DiTTransformer2DModel", "Transformer2DModel"):
        return DiTAdapter(pipe)
    raise ValueError(f"unsupported pipeline {type(pipe).__name__} (denoiser {name}); supported denoisers: "
                     "UNet2DConditionModel (SD 1.x/2.x/SDXL), SD3Transformer2DModel, FluxTransformer2DModel, "
                     "PixArtTransformer2DModel, DiTTransformer2DModel/Transformer2DModel (DiT)")


def grid_for_tokens(n_tokens: int, lat_h: int, lat_w: int) -> tuple[int, int]:
    """The (h, w) grid of ``n_tokens`` tokens over a latent of ``lat_h x lat_w`` (same aspect ratio)."""
    f = math.sqrt(lat_h * lat_w / n_tokens)
    h, w = round(lat_h / f), round(lat_w / f)
    if h * w != n_tokens:
        raise ValueError(f"{n_tokens} tokens do not tile a {lat_h}x{lat_w} latent")
    return h, w
