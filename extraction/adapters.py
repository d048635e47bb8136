"""One adapter per architecture family: the single home of everything model-specific.

Extraction, saliency, steering, erasure, the zoo's trainer and the benchmarks never branch on
the model: they ask the pipeline's adapter (``get_adapter(pipe)``) which family it is, how to
encode prompts (and with which text encoder words are read), which attention modules hold the
cross-attention, the image-token grid of a call and how latents are packed, how to noise
latents and what the denoiser predicts, how ONE denoiser call is made, which generation
arguments fit and how guidance runs (how many denoiser calls a step makes). The questions and
how to add a family: docs/design.md ("Model families").

* ``UNetAdapter``   - SD 1.x / 2.x / SDXL (``pipe.unet``), maps are (B, C, H, W).
* ``SD3Adapter``, ``FluxAdapter`` (``MMDiTAdapter``) - joint attention over text and image
  tokens; double/joint blocks return ``(text, image)`` tuples, image tokens (B, T, C).
* ``PixArtAdapter`` (T5 cross-attention) and ``DiTAdapter`` (class labels) - single-stream
  DiTs, image tokens (B, T, C).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
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


def call_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The latent input of one denoiser call (``sample`` for UNets, ``hidden_states`` for transformers)."""
    if args:
        return args[0]
    for key in ("hidden_states", "sample"):
        if key in kwargs:
            return kwargs[key]
    raise TypeError("cannot find the latent input of the denoiser call")


class Adapter:
    """Base class; one subclass per architecture family answers every model-specific question.

    Identity: ``family`` (coarse, stored in activation files: unet | mmdit | dit), ``kind`` (fine:
    unet | sd3 | flux | pixart | dit), ``accepts(denoiser)`` (which pipelines it serves).
    Text: ``text_encoders()``, ``word_encoder()``, ``text_length()``, ``encode_prompts()``,
    ``text_key_offset()``. Attention: ``cross_attention`` (separate | joint | None),
    ``cross_attention_modules()``. Tokens: ``token_grid()`` of a call, ``image_grid()`` of latents,
    ``n_tokens()``, ``pack()``/``unpack()``. Noise: ``flow``, ``add_noise()``, ``noise()``,
    ``training_target()``, ``model_time()``. Calls: ``denoise()``, ``forward()``.
    Generation: ``guidance`` (cfg | true_cfg | distilled), ``generation_kwargs()``,
    ``batched_cfg()``, ``denoiser_calls_per_step()``. Hooks: ``hook_names()``, ``block_names()``,
    ``image_part()``, ``module_depth`` (``hook_depth_key``).
    """

    family: str = ""
    kind: str = ""
    flow: bool = False
    #: how the pipeline guides: "cfg" (one batched call on [unconditional, conditional] when
    #: guidance_scale > 1), "true_cfg" (two calls a step, conditional then unconditional, when
    #: true_cfg_scale > 1 and a negative prompt is given) or "distilled" (the scale is an input
    #: embedding of one conditional call)
    guidance: str = "cfg"
    #: "separate" (image queries attend to text keys in their own module), "joint" (one attention
    #: over [text, image] tokens) or None (no text conditioning)
    cross_attention: str | None = "separate"
    #: the family's usual default T5 length (``max_sequence_length``), used when the pipeline's own
    #: ``__call__`` declares none; None: the family encodes no T5 text
    text_length_fallback: int | None = None
    #: the pipeline attribute holding the denoiser
    denoiser_key: str = "transformer"
    #: the denoiser's top-level modules by the order the input passes them (0: embeddings, 4: output
    #: layers); what ``hook_depth_key`` sorts hooks by, from their names alone (stores keep no pipeline)
    module_depth: dict[str, int] = {}

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.denoiser: torch.nn.Module = self._denoiser(pipe)
        self.vae = pipe.vae
        self._ddpm = None
        if not self.flow:
            from diffusers import DDPMScheduler

            # The paper's x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, whatever sampler the pipeline ships.
            self._ddpm = DDPMScheduler.from_config(pipe.scheduler.config)

    @classmethod
    def accepts(cls, denoiser: torch.nn.Module) -> bool:  # pragma: no cover - abstract
        """Whether this family serves a pipeline with this denoiser (the one place families are told apart)."""
        raise NotImplementedError

    def _denoiser(self, pipe: Any) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_key)

    def trainable(self) -> dict[str, torch.nn.Module]:
        """The denoiser and every text encoder, by pipeline attribute (what text-to-image training updates)."""
        return {self.denoiser_key: self.denoiser, **{k: enc for k, (_, enc) in self.text_encoders().items()}}

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

    def max_image_size(self) -> int | None:
        """The largest square image side (pixels) the denoiser's position embedding covers (None: any)."""
        limit = getattr(self.denoiser.config, "pos_embed_max_size", None)
        if not limit:
            return None
        return int(limit) * self.patch() * int(self.pipe.vae_scale_factor)

    # --- noising ------------------------------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, time: Any) -> torch.Tensor:
        """x_time from clean latents and noise, ``time`` in the family's training units (per sample or one value).

        Flow models: ``time`` = s in [0, 1], ``x_s = (1 - s) x0 + s eps``. DDPM models: integer
        timesteps (a long tensor of the batch size), the scheduler's ``add_noise``.
        """
        if self.flow:
            s = time[:, None, None, None] if isinstance(time, torch.Tensor) and time.ndim == 1 else time
            return (1 - s) * x0 + s * eps
        return self._ddpm.add_noise(x0, eps, time)

    def noise(self, latents: torch.Tensor, t: int, generator: torch.Generator | list[torch.Generator] | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise clean latents to integer timestep ``t`` in [0, 1000): DDPM ``add_noise`` or flow interpolation."""
        if not 0 <= int(t) < 1000:
            raise ValueError(f"timestep {t} is outside [0, 1000)")
        eps = draw_noise(latents.shape, generator) if noise is None else noise
        eps = eps.to(latents.device, torch.float32)
        x0 = latents.float()
        if self.flow:
            xt = self.add_noise(x0, eps, t / 1000.0)
        else:
            ts = torch.full((x0.shape[0],), int(t), dtype=torch.long)
            xt = self.add_noise(x0, eps, ts.to(x0.device))
        return xt.to(latents.dtype)

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, time: Any = None) -> torch.Tensor:
        """What the denoiser predicts: the velocity ``eps - x0`` (flow), ``eps`` or the v target (DDPM)."""
        if self.flow:
            return eps - x0
        kind = self._ddpm.config.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "v_prediction":
            return self._ddpm.get_velocity(x0, eps, time)
        raise ValueError(f"prediction type {kind!r} has no training target here (epsilon, v_prediction)")

    def model_time(self, t: int, batch: int) -> torch.Tensor:
        """Integer timestep ``t`` in [0, 1000) as the denoiser's time input for a batch (flow: s = t / 1000)."""
        if self.flow:
            return torch.full((batch,), t / 1000.0, dtype=self.dtype, device=self.device)
        return torch.full((batch,), int(t), dtype=torch.long, device=self.device)

    # --- text ---------------------------------------------------------------------------------------------------
    def text_encoders(self) -> dict[str, tuple[Any, Any]]:
        """Every (tokenizer, text encoder) pair the pipeline encodes prompts with, by its attribute suffix."""
        out = {}
        for suffix in ("", "_2", "_3"):
            enc = getattr(self.pipe, f"text_encoder{suffix}", None)
            if enc is not None:
                out[f"text_encoder{suffix}"] = (getattr(self.pipe, f"tokenizer{suffix}", None), enc)
        return out

    def word_encoder(self) -> tuple[Any, Any]:
        """(tokenizer, text encoder) whose tokens are the denoiser's text keys that words are read at."""
        return getattr(self.pipe, "tokenizer", None), getattr(self.pipe, "text_encoder", None)

    def text_key_offset(self, n_keys: int, n_ids: int) -> int:
        """Position of the word encoder's first token among ``n_keys`` text keys (``n_ids`` tokens of it)."""
        return 0

    @property
    def default_text_length(self) -> int | None:
        """The pipeline's own default T5 length (its ``max_sequence_length`` default: PixArt-alpha 120,
        PixArt-sigma 300, SD3 256, Flux 512); None for families without T5 text."""
        if self.text_length_fallback is None:
            return None
        own = self._call_default("max_sequence_length")
        return int(own) if isinstance(own, int) and not isinstance(own, bool) else self.text_length_fallback

    def text_length(self) -> int | None:
        """The T5 length prompts are encoded with: the tokenizer's own when shorter than the pipeline's default."""
        if self.default_text_length is None:
            return None
        tokenizer = self.word_encoder()[0]
        default = self.default_text_length
        n = getattr(tokenizer, "model_max_length", default) if tokenizer is not None else default
        return int(min(default, n)) if n else default

    def encode_prompts(self, prompts: list[str], grad: bool = False) -> dict[str, Any]:
        """The denoiser's conditioning keyword arguments for ``prompts`` (``grad``: keep the graph, for training)."""
        with contextlib.nullcontext() if grad else torch.no_grad():
            return self._encode_prompts(list(prompts))

    def _encode_prompts(self, prompts: list[str]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- one denoiser call --------------------------------------------------------------------------------------
    def denoise(self, noisy: torch.Tensor, time: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """One denoiser call (graph kept) on latents (B, C, H, W); ``time`` per sample in the model's units."""
        out = self.denoiser(**self.denoiser_inputs(noisy, time, cond), return_dict=False)[0]
        return self.unpack(out, noisy.shape[-2], noisy.shape[-1])

    def denoiser_inputs(self, noisy: torch.Tensor, time: torch.Tensor, cond: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of one denoiser call (latents packed where the family packs them)."""
        raise NotImplementedError  # pragma: no cover - abstract

    @torch.no_grad()
    def forward(self, noisy: torch.Tensor, t: int, cond: dict[str, Any]) -> torch.Tensor:
        """ONE denoiser call at integer timestep ``t``: the prediction in latent layout (B, C', H, W)."""
        return self.denoise(noisy, self.model_time(t, noisy.shape[0]), cond)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H, W) as the denoiser's input layout (identity unless the family packs)."""
        return latents

    def unpack(self, out: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """A denoiser output back to latent layout (B, C', h, w) (identity unless the family packs)."""
        return out

    # --- generation ---------------------------------------------------------------------------------------------
    def generation_kwargs(self, guidance_scale: float | None = None, batch: int = 1,
                          negative: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``pipe(prompts, **kw)`` that fit the family.

        * the T5 length prompts are encoded with (``text_length``), when shorter than the
          pipeline's default (the zoo models were trained on 32 tokens);
        * ``guidance_scale`` (None: the pipeline's default) means classifier-free guidance against
          the empty prompt (or ``negative``): ``true_cfg`` families get ``true_cfg_scale`` and a
          negative prompt when the scale is > 1, every other family ``guidance_scale``.
        """
        kw: dict[str, Any] = {}
        n = self.text_length()
        if n is not None and n < self.default_text_length:
            kw["max_sequence_length"] = int(n)
        if guidance_scale is None:
            return kw
        if self.guidance == "true_cfg":
            if guidance_scale > 1:
                kw.update(true_cfg_scale=float(guidance_scale), negative_prompt=[""] * batch if batch > 1 else "")
            else:
                return kw
        else:
            kw["guidance_scale"] = float(guidance_scale)
        if negative is not None:
            kw["negative_prompt"] = [negative] * batch
        return kw

    def _call_default(self, name: str) -> Any:
        p = inspect.signature(type(self.pipe).__call__).parameters.get(name)
        return None if p is None else p.default

    def batched_cfg(self, kwargs: dict[str, Any]) -> bool:
        """Whether ``pipe(**kwargs)`` runs each step as ONE call on the batch [unconditional, conditional]."""
        if self.guidance != "cfg":
            return False
        scale = kwargs.get("guidance_scale", self._call_default("guidance_scale"))
        return scale is not None and float(scale) > 1

    def denoiser_calls_per_step(self, kwargs: dict[str, Any]) -> int:
        """Denoiser calls one denoising step of ``pipe(**kwargs)`` makes (true CFG: 2, conditional first)."""
        if self.guidance != "true_cfg":
            return 1
        scale = kwargs.get("true_cfg_scale", self._call_default("true_cfg_scale") or 1.0)
        negative = kwargs.get("negative_prompt") is not None or (
            kwargs.get("negative_prompt_embeds") is not None and kwargs.get("negative_pooled_prompt_embeds") is not None)
        return 2 if float(scale) > 1 and negative else 1

    # --- attention and tokens -----------------------------------------------------------------------------------
    def cross_attention_modules(self, include_mid: bool = False) -> dict[str, torch.nn.Module]:
        """The attention modules where image queries meet the prompt's keys, by module path."""
        return {}

    def patch(self) -> int:
        return int(self.denoiser.config.patch_size)

    def token_grid(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int]:
        """(h, w) of the image-token grid of one denoiser call (from its hook's args; any resolution)."""
        x = call_input(args, kwargs)
        p = self.patch()
        return int(x.shape[-2]) // p, int(x.shape[-1]) // p

    def image_grid(self, latents: torch.Tensor) -> tuple[int, int]:
        """(h, w) of the image-token grid (DiTs) or of the latent map (UNets)."""
        p = self.patch()
        return int(latents.shape[-2]) // p, int(latents.shape[-1]) // p

    def n_tokens(self, grid: tuple[int, int]) -> int | None:
        """Image tokens in the denoiser's sequence for a grid (None for UNets, whose maps are not sequences)."""
        return grid[0] * grid[1]

    def n_image_tokens(self, latents: torch.Tensor) -> int | None:
        """Image tokens per sample in the denoiser's sequence (None for UNets, whose maps are not sequences)."""
        return self.n_tokens(self.image_grid(latents))

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

    family = kind = "unet"
    flow = False

    @classmethod
    def accepts(cls, denoiser: torch.nn.Module) -> bool:
        return type(denoiser).__name__ == "UNet2DConditionModel"

    denoiser_key = "unet"
    module_depth = {"conv_in": 0, "time_embedding": 0, "down_blocks": 1, "mid_block": 2, "up_blocks": 3,
                    "conv_out": 4}

    @property
    def guidance(self) -> str:  # type: ignore[override]
        # LCM-style UNets embed the guidance scale (``time_cond_proj_dim``) and run no CFG batch.
        return "distilled" if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None else "cfg"

    def image_grid(self, latents: torch.Tensor) -> tuple[int, int]:
        return int(latents.shape[-2]), int(latents.shape[-1])

    def token_grid(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int]:
        x = call_input(args, kwargs)
        return int(x.shape[-2]), int(x.shape[-1])

    def n_tokens(self, grid: tuple[int, int]) -> int | None:
        return None

    def max_image_size(self) -> int | None:
        return None

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.denoiser.config, "addition_embed_type", None) == "text_time"

    def _encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        if self.is_sdxl:
            emb, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False)
            return {"encoder_hidden_states": emb.to(self.dtype), "text_embeds": pooled.to(self.dtype)}
        emb, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"encoder_hidden_states": emb.to(self.dtype)}

    def denoise(self, noisy: torch.Tensor, time: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        b = noisy.shape[0]
        kw: dict[str, Any] = {}
        if self.is_sdxl:
            size = (noisy.shape[-2] * self.pipe.vae_scale_factor, noisy.shape[-1] * self.pipe.vae_scale_factor)
            proj = self.pipe.text_encoder_2.config.projection_dim if self.pipe.text_encoder_2 is not None \
                else int(cond["text_embeds"].shape[-1])
            ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=self.dtype, text_encoder_projection_dim=proj)
            kw["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": ids.to(self.device).repeat(b, 1)}
        return self.denoiser(noisy, time, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False,
                             **kw)[0]

    def cross_attention_modules(self, include_mid: bool = False) -> dict[str, torch.nn.Module]:
        """Text cross-attention (``...transformer_blocks.N.attn2``) of the down and up blocks (+ mid on request)."""
        keep = ("down_blocks", "up_blocks") + (("mid_block",) if include_mid else ())
        return {n: m for n, m in self.denoiser.named_modules()
                if n.endswith(".attn2") and n.startswith(keep) and hasattr(m, "set_processor")}

    def block_names(self) -> list[str]:
        return [n for n in self.hook_names()
                if n == "mid_block" or (n.count(".") == 1 and n.startswith(("down_blocks", "up_blocks")))]


class MMDiTAdapter(Adapter):
    """Base of the MM-DiTs (joint attention over text and image tokens; rectified flow)."""

    family = "mmdit"
    flow = True
    cross_attention = "joint"
    text_first: bool = False  # order of the two token groups in the joint attention sequence
    module_depth = {"x_embedder": 0, "pos_embed": 0, "transformer_blocks": 1, "single_transformer_blocks": 2,
                    "norm_out": 4, "proj_out": 4}

    def joint_blocks(self) -> list[torch.nn.Module]:
        """The double-stream (joint image/text) blocks, in depth order."""
        return list(self.denoiser.transformer_blocks)

    def cross_attention_modules(self, include_mid: bool = False) -> dict[str, torch.nn.Module]:
        """The joint attention of every double-stream block (image queries over [text, image] keys)."""
        return {f"transformer_blocks.{i}.attn": b.attn for i, b in enumerate(self.joint_blocks())}

    def image_rows(self, text_len: int, n_image: int) -> slice:
        """Rows of the image tokens in the joint attention sequence."""
        return slice(text_len, text_len + n_image) if self.text_first else slice(0, n_image)

    def image_part(self, out: Any, n_img: int | None) -> torch.Tensor:
        # Double-stream / joint blocks return (text stream, image stream): keep the image stream.
        if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], torch.Tensor):
            out = out[1]
        return super().image_part(out, n_img)

    def block_names(self) -> list[str]:
        return [n for n in self.hook_names() if n.count(".") == 1
                and n.startswith(("transformer_blocks", "single_transformer_blocks"))]


class SD3Adapter(MMDiTAdapter):
    """SD3 / 3.5: joint blocks over [image, text]; CLIP-L | CLIP-G | T5 text; timestep = 1000 s."""

    kind = "sd3"
    text_length_fallback = 256

    @classmethod
    def accepts(cls, denoiser: torch.nn.Module) -> bool:
        return type(denoiser).__name__ == "SD3Transformer2DModel"

    def word_encoder(self) -> tuple[Any, Any]:
        return getattr(self.pipe, "tokenizer_3", None), getattr(self.pipe, "text_encoder_3", None)

    def text_key_offset(self, n_keys: int, n_ids: int) -> int:
        return n_keys - n_ids  # the text sequence is [CLIP (tokenizer_max_length) | T5]

    def _encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        emb, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.text_length())
        return {"encoder_hidden_states": emb.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def denoiser_inputs(self, noisy: torch.Tensor, time: torch.Tensor, cond: dict[str, Any]) -> dict[str, Any]:
        return dict(hidden_states=noisy, timestep=time * 1000.0, encoder_hidden_states=cond["encoder_hidden_states"],
                    pooled_projections=cond["pooled_projections"])


class FluxAdapter(MMDiTAdapter):
    """Flux: double-stream blocks over [text, image] then single-stream blocks; latents packed 2x2 into tokens."""

    kind = "flux"
    text_first = True
    text_length_fallback = 512

    @classmethod
    def accepts(cls, denoiser: torch.nn.Module) -> bool:
        return type(denoiser).__name__ == "FluxTransformer2DModel"

    @property
    def guidance(self) -> str:  # type: ignore[override]
        # FLUX.1-dev embeds the guidance scale; models without the embedding (schnell, tiny-flux) take true CFG.
        return "distilled" if self.denoiser.config.guidance_embeds else "true_cfg"

    def word_encoder(self) -> tuple[Any, Any]:
        return getattr(self.pipe, "tokenizer_2", None), getattr(self.pipe, "text_encoder_2", None)

    def patch(self) -> int:
        return 2

    def max_image_size(self) -> int | None:
        return None

    def token_grid(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int]:
        ids = kwargs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        return int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1

    def _encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        emb, pooled, txt_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.text_length())
        return {"encoder_hidden_states": emb.to(self.dtype), "pooled_projections": pooled.to(self.dtype),
                "txt_ids": txt_ids}

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def unpack(self, out: torch.Tensor, h: int, w: int) -> torch.Tensor:
        f = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(out, h * f, w * f, f)

    def image_ids(self, batch: int, h: int, w: int) -> torch.Tensor:
        """Flux's positional ids of the packed image tokens of an (h, w) latent."""
        return self.pipe._prepare_latent_image_ids(batch, h // 2, w // 2, self.device, self.dtype)

    def denoiser_inputs(self, noisy: torch.Tensor, time: torch.Tensor, cond: dict[str, Any]) -> dict[str, Any]:
        b, _, h, w = noisy.shape
        guidance = torch.full((b,), 3.5, dtype=self.dtype, device=self.device) \
            if self.denoiser.config.guidance_embeds else None
        return dict(hidden_states=self.pack(noisy), timestep=time, guidance=guidance,
                    encoder_hidden_states=cond["encoder_hidden_states"],
                    pooled_projections=cond["pooled_projections"], txt_ids=cond["txt_ids"],
                    img_ids=self.image_ids(b, h, w))


def _transformer2d_captioned(denoiser: torch.nn.Module) -> bool | None:
    """For the legacy ``Transformer2DModel`` (hub PixArt and DiT checkpoints): captioned (PixArt) or not."""
    if type(denoiser).__name__ != "Transformer2DModel":
        return None
    return getattr(denoiser.config, "caption_channels", None) is not None


class PixArtAdapter(Adapter):
    """PixArt-alpha / sigma: single-stream DiT blocks with T5 cross-attention (``attn2``); DDPM."""

    family, kind = "dit", "pixart"
    flow = False
    text_length_fallback = 120
    module_depth = {"pos_embed": 0, "transformer_blocks": 1, "norm_out": 4, "proj_out": 4}

    @classmethod
    def accepts(cls, denoiser: torch.nn.Module) -> bool:
        return type(denoiser).__name__ == "PixArtTransformer2DModel" or _transformer2d_captioned(denoiser) is True

    def _encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        emb, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                                  num_images_per_prompt=1, clean_caption=False,
                                                  max_sequence_length=self.text_length())
        return {"encoder_hidden_states": emb.to(self.dtype), "encoder_attention_mask": mask}

    def denoise(self, noisy: torch.Tensor, time: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        b = noisy.shape[0]
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(self.denoiser, "use_additional_conditions", False):
            size = float(noisy.shape[-1] * self.pipe.vae_scale_factor)
            added = {"resolution": torch.tensor([[size, size]] * b, dtype=self.dtype, device=self.device),
                     "aspect_ratio": torch.ones((b, 1), dtype=self.dtype, device=self.device)}
        return self.denoiser(noisy, encoder_hidden_states=cond["encoder_hidden_states"], timestep=time,
                             encoder_attention_mask=cond["encoder_attention_mask"], added_cond_kwargs=added,
                             return_dict=False)[0]

    def cross_attention_modules(self, include_mid: bool = False) -> dict[str, torch.nn.Module]:
        """The T5 cross-attention (``transformer_blocks.N.attn2``) of every block."""
        return {n: m for n, m in self.denoiser.named_modules()
                if n.endswith(".attn2") and n.startswith("transformer_blocks") and hasattr(m, "set_processor")}

    def block_names(self) -> list[str]:
        return [n for n in self.hook_names() if n.count(".") == 1 and n.startswith("transformer_blocks")]


class DiTAdapter(Adapter):
    """DiT (Peebles & Xie): class-conditional single-stream blocks (ImageNet labels, no text); DDPM."""

    family = kind = "dit"
    flow = False
    cross_attention = None
    module_depth = {"pos_embed": 0, "transformer_blocks": 1, "norm_out": 4, "proj_out": 4}

    @classmethod
    def accepts(cls, denoiser: torch.nn.Module) -> bool:
        return type(denoiser).__name__ == "DiTTransformer2DModel" or _transformer2d_captioned(denoiser) is False

    def text_encoders(self) -> dict[str, tuple[Any, Any]]:
        return {}

    def word_encoder(self) -> tuple[Any, Any]:
        return None, None

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

    def _encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        return {"class_labels": self.class_ids(prompts)}

    def denoise(self, noisy: torch.Tensor, time: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return self.denoiser(noisy, timestep=time, class_labels=cond["class_labels"], return_dict=False)[0]

    def block_names(self) -> list[str]:
        return [n for n in self.hook_names() if n.count(".") == 1 and n.startswith("transformer_blocks")]


#: Every family, asked in order by ``get_adapter``; a new family is one more class here.
ADAPTERS: tuple[type[Adapter], ...] = (UNetAdapter, SD3Adapter, FluxAdapter, PixArtAdapter, DiTAdapter)


def get_adapter(pipe: Any) -> Adapter:
    """The adapter for ``pipe``'s architecture family; a clear error for unsupported pipelines."""
    den = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if den is not None:
        for cls in ADAPTERS:
            if cls.accepts(den):
                return cls(pipe)
    name = type(den).__name__ if den is not None else "none"
    raise ValueError(f"unsupported pipeline {type(pipe).__name__} (denoiser {name}); supported denoisers: "
                     "UNet2DConditionModel (SD 1.x/2.x/SDXL), SD3Transformer2DModel, FluxTransformer2DModel, "
                     "PixArtTransformer2DModel, DiTTransformer2DModel/Transformer2DModel (DiT)")


def hook_depth_key(hook: str) -> tuple:
    """Sort key putting hook names in the order the input passes them, whatever the family (UNet: down < mid <
    up; MM-DiT: double-stream < single-stream blocks); numbers compared as numbers, not as text.

    Families' ``module_depth`` tables agree where they share a name; a name none knows sorts between the
    blocks and the output layers."""
    depth: dict[str, int] = {}
    for cls in ADAPTERS:
        depth.update(cls.module_depth)
    parts = hook.split(".")
    return (depth.get(parts[0], 3),) + tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def grid_for_tokens(n_tokens: int, lat_h: int, lat_w: int) -> tuple[int, int]:
    """The (h, w) grid of ``n_tokens`` tokens over a latent of ``lat_h x lat_w`` (same aspect ratio)."""
    f = math.sqrt(lat_h * lat_w / n_tokens)
    h, w = round(lat_h / f), round(lat_w / f)
    if h * w != n_tokens:
        raise ValueError(f"{n_tokens} tokens do not tile a {lat_h}x{lat_w} latent")
    return h, w
