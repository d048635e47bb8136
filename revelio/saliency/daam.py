"""DAAM: Diffusion Attentive Attribution Maps (Tang et al., ACL 2023), and its DiT cross-attention variant.

UNet pipelines (SD 1.x/2.x, SDXL): every cross-attention module (``attn2``) of the down and
up blocks (the mid block on request) gets a wrapping processor. The original processor
runs unchanged; the wrapper takes the query/key projections it computed and forms the
attention probabilities softmax(Q K^T / sqrt(d)) (batch, heads, HW, tokens). Only the
conditional half of a classifier-free-guidance batch is kept. Aggregation follows the
reference code (daam 0.2.0): each layer keeps one running sum per head and token over the
calls at its own resolution (memory does not grow with steps); ``maps()`` upsamples each
(layer, head) sum bicubically to the latent size, clamps it at 0 and averages over heads,
layers and calls. ``order="clamp_each_step"`` instead upsamples and clamps every call's map
before adding it to one running sum per token at latent size (slightly different maps).

PixArt: the same on the T5 cross-attention (``attn2``) of every transformer block, on the
image-token grid; the padding keys the pipeline masks are masked here too.

MM-DiT pipelines (Flux, SD3): the same idea inside joint attention: the probabilities of
image queries over the whole joint key set, read at the prompt's (T5) text keys, on the
image-token grid.

    with trace(pipe) as tc:
        pipe("a red circle and a blue square")
    heat = tc.word_map("circle")        # (H, W) tensor
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from extraction.adapters import get_adapter, grid_for_tokens

from ..config import RevelioError
from .hooks import ConditionalRows, HookSession, captured, hooked, swapped_processors
from .mmdit import denoiser_input, image_heads, rotate, split_heads
from .words import positions_of, word_positions


ORDERS = ("reference", "clamp_each_step")


class _Processor:
    """Runs the original processor, then hands the captured projections to the trace."""

    def __init__(self, inner, tracer: "DAAMTrace", name: str):
        self.inner, self.tracer, self.name = inner, tracer, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        extra = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        layers = dict(q=attn.to_q, k=attn.to_k)
        if self.tracer.joint:
            layers["tk"] = attn.add_k_proj
        with captured(**layers) as cap:
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **extra, **kwargs)
        if self.tracer._active:  # a counted, conditional call
            with torch.no_grad():
                if not self.tracer.joint:
                    self.tracer._cross_layer(self.name, attn, cap, attention_mask)
                else:
                    self.tracer._dit_layer(self.name, attn, cap, image_rotary_emb, encoder_hidden_states.shape[1])
        return out


class DAAMTrace(HookSession):
    """Context manager accumulating per-token attribution maps over every denoiser call in its body.

    ``include_mid``: also trace the UNet's mid block. ``steps``: indices of the denoiser calls
    that count (None: all). ``cfg``: see :class:`~revelio.saliency.hooks.ConditionalRows` (None: detect).
    ``order``: "reference" (sum per layer and head over calls at native resolution, upsample and
    clamp when maps are read) or "clamp_each_step" (upsample and clamp each call's map, then sum).
    """

    def __init__(self, pipe, include_mid: bool = False, steps: Sequence[int] | None = None, cfg: bool | None = None,
                 order: Literal["reference", "clamp_each_step"] = "reference"):
        if order not in ORDERS:
            raise RevelioError(f"DAAM order {order!r} is not one of {list(ORDERS)}")
        self.order = order
        self.pipe = pipe
        self.adapter = ad = get_adapter(pipe)
        self.family = ad.kind  # unet | sd3 | flux | pixart
        self.joint = ad.cross_attention == "joint"  # MM-DiT joint attention, else separate cross-attention
        self.denoiser = ad.denoiser
        self.modules = ad.cross_attention_modules(include_mid)
        self.tokenizer, self.text_encoder = ad.word_encoder()
        if not self.modules:
            raise RevelioError(f"{type(pipe).__name__}: no cross-attention modules to trace (DAAM needs text "
                               f"cross-attention; {ad.kind} has none)")
        self.steps = None if steps is None else set(steps)
        self._conditional = ConditionalRows(cfg)
        self.reset()

    def reset(self) -> None:
        """Forget maps and the captured prompt (keeps the hooks)."""
        self._sum: torch.Tensor | None = None  # order "clamp_each_step": (B, tokens, H, W) at latent size
        self._layer_sums: dict[str, torch.Tensor] = {}  # order "reference": (B, heads, tokens, h, w) per layer
        self._count = 0
        self._maps: torch.Tensor | None = None  # maps() of the current sums
        self.calls = 0
        self.input_ids: list[list[int]] | None = None
        self._active = False

    def _install(self, stack: ExitStack) -> None:
        if self.text_encoder is not None:
            stack.enter_context(hooked(self.text_encoder, pre=self._on_text, with_kwargs=True))
        stack.enter_context(hooked(self.denoiser, pre=self._on_call, with_kwargs=True))
        stack.enter_context(swapped_processors(self.modules, lambda name, m, orig: _Processor(orig, self, name)))

    # -- hooks ------------------------------------------------------------------------------
    def _on_text(self, _m, args, kwargs):
        """The first text-encoder call of the run is the prompt (pipelines encode negatives after it)."""
        if self.input_ids is None:
            ids = args[0] if args else kwargs["input_ids"]
            self.input_ids = ids.tolist()

    def _on_call(self, module, args, kwargs):
        x = denoiser_input(args, kwargs)
        self._rows = self._conditional.rows(x, kwargs.get("encoder_hidden_states"))
        if self._rows is None:  # classifier-free guidance's unconditional call
            self._active = False
            return
        self.latent = self.adapter.token_grid(args, kwargs)
        self._active = self.steps is None or self.calls in self.steps
        self.calls += 1

    # -- the method ---------------------------------------------------------------------------
    def _cross_layer(self, name: str, attn: nn.Module, cap: dict, mask: torch.Tensor | None = None) -> None:
        q = split_heads(cap["q"][self._rows], attn.heads)
        k = split_heads(cap["k"][self._rows], attn.heads)
        logits = torch.einsum("bnhd,bthd->bhnt", q.float(), k.float()).mul(attn.scale)
        if mask is not None:  # PixArt: padding keys of the T5 text are masked (additive bias, (B, 1, T))
            logits = logits + mask[self._rows].float().reshape(logits.shape[0], 1, 1, -1)
        probs = logits.softmax(-1)
        self._accumulate(name, probs)

    def _dit_layer(self, name: str, attn: nn.Module, cap: dict, rotary, text_len: int) -> None:
        rows = self._rows
        img = image_heads(attn, {k: v[rows] for k, v in cap.items() if k in ("q", "k")}, self.adapter, rotary,
                          text_len, names=("q", "k"))
        tk = split_heads(cap["tk"][rows], attn.heads)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        if rotary is not None:  # Flux: text first in the joint sequence, with its own rotary rows
            tk = rotate(tk, rotary, slice(0, text_len))
        scale = img["q"].shape[-1] ** -0.5
        probs = []
        for h in range(attn.heads):  # one head at a time: (N, N + T) logits, not (heads, N, N + T)
            q = img["q"][:, :, h].float()
            lt = torch.einsum("bnd,btd->bnt", q, tk[:, :, h].float()) * scale
            li = torch.einsum("bnd,bmd->bnm", q, img["k"][:, :, h].float()) * scale
            lse = torch.logsumexp(torch.cat([lt, li], dim=-1), dim=-1, keepdim=True)
            probs.append((lt - lse).exp())
        self._accumulate(name, torch.stack(probs, dim=1))

    def _accumulate(self, name: str, probs: torch.Tensor) -> None:
        """(B, heads, N, T) probabilities of one layer and call -> the running sums (see ``order``)."""
        b, heads, n, t = probs.shape
        lat_h, lat_w = self.latent
        h, w = grid_for_tokens(n, lat_h, lat_w)
        maps = probs.transpose(2, 3).reshape(b, heads, t, h, w)
        self._maps = None
        if self.order == "reference":
            acc = self._layer_sums.get(name)
            if acc is None:
                acc = self._layer_sums[name] = torch.zeros_like(maps)
            self._check_shape(acc, maps)
            acc += maps
        else:
            maps = _upsample_clamp(maps, (lat_h, lat_w)).sum(1)
            if self._sum is None:
                self._sum = torch.zeros_like(maps)
            self._check_shape(self._sum, maps)
            self._sum += maps
        self._count += heads

    @staticmethod
    def _check_shape(acc: torch.Tensor, maps: torch.Tensor) -> None:
        if acc.shape != maps.shape:
            raise RevelioError(f"the batch or resolution changed within one trace ({tuple(acc.shape)} -> "
                               f"{tuple(maps.shape)}); use one trace per batch or call reset()")

    # -- results ------------------------------------------------------------------------------
    def maps(self) -> torch.Tensor:
        """Per-token heat maps (batch, text tokens, H, W): the mean over heads, layers and traced calls."""
        if self._count == 0:
            raise RevelioError("no maps recorded: run the pipeline (or a denoiser call) inside the `with` block")
        if self._maps is None:
            if self.order == "reference":
                total = sum(_upsample_clamp(acc, self.latent).sum(1) for acc in self._layer_sums.values())
            else:
                total = self._sum
            self._maps = total / self._count
        return self._maps

    def _prompt_index(self, index: int) -> int:
        if self.input_ids is None:
            raise RevelioError("no prompt was encoded inside the trace, so words cannot be found; "
                               "encode the prompt inside the `with` block")
        batch = self.maps().shape[0]
        if not 0 <= index < batch:
            raise IndexError(f"image index {index} out of range for a batch of {batch}")
        return index * len(self.input_ids) // batch

    def words(self, index: int = 0) -> list[tuple[str, list[int]]]:
        """(word, key positions) of image ``index``'s prompt; positions index ``maps()``'s token axis."""
        ids = self.input_ids[self._prompt_index(index)]
        offset = self.adapter.text_key_offset(self.maps().shape[1], len(ids))
        return [(w, [p + offset for p in pos]) for w, pos in word_positions(self.tokenizer, ids)]

    def tokens(self, index: int = 0) -> list[tuple[str, int]]:
        """(token, key position) of every token of image ``index``'s prompt, start, end and padding included
        (``</w>`` stripped): the rows of ``maps()[index]`` one by one, for looking at tokens ``words`` groups."""
        ids = self.input_ids[self._prompt_index(index)]
        offset = self.adapter.text_key_offset(self.maps().shape[1], len(ids))
        toks = self.tokenizer.convert_ids_to_tokens(list(ids))
        return [(t.replace("</w>", ""), k + offset) for k, t in enumerate(toks)]

    def word_map(self, word: str, index: int = 0) -> torch.Tensor:
        """The map of ``word`` (H, W): mean over its sub-tokens and occurrences; several words are averaged."""
        pos = positions_of(word, self.words(index))
        return self.maps()[index, pos].mean(0)

    def word_maps(self, words: Sequence[str], index: int = 0) -> torch.Tensor:
        """Maps of several words, (len(words), H, W)."""
        if not words:
            raise RevelioError("the word list is empty; pass at least one word of the prompt")
        return torch.stack([self.word_map(w, index) for w in words])


def _upsample_clamp(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, heads, T, h, w) -> bicubic to ``size``, clamped at 0 (bicubic overshoots below 0)."""
    b, heads, t, h, w = maps.shape
    if (h, w) != tuple(size):
        maps = F.interpolate(maps.reshape(b * heads, t, h, w), size=tuple(size), mode="bicubic",
                             align_corners=False).view(b, heads, t, *size)
    return maps.clamp(min=0)


def trace(pipe, include_mid: bool = False, steps: Sequence[int] | None = None, cfg: bool | None = None,
          order: Literal["reference", "clamp_each_step"] = "reference") -> DAAMTrace:
    """``with trace(pipe) as tc: pipe(prompt)`` then ``tc.word_map(word)``; see :class:`DAAMTrace`."""
    return DAAMTrace(pipe, include_mid=include_mid, steps=steps, cfg=cfg, order=order)
