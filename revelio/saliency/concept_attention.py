"""ConceptAttention (Helbling et al., ICML 2025) for MM-DiT pipelines (Flux, SD3).

Concept words get a residual stream of their own that runs through the TEXT stream's
weights of every double-stream block: the block's adaptive norm, q/k/v projections and
q/k norms, a SECOND attention in which concept queries attend to [concept, image] keys,
the output projection, gates and MLP. By default the concepts are encoded and modulated as
the reference code does (``encoding``/``modulation``, see ``mmdit.encode_concepts`` and
``mmdit.resolve_concept_options``): Flux: each concept alone, first T5 token, adaptive norms
driven by the timestep embedding of a ZERO pooled vector; SD3: the joined concepts as one
prompt, the prompt's own ``temb``.
Image and prompt tokens never see the concepts, so the generated image is unchanged
(the original attention processor runs untouched; ours only adds work after it).

Saliency per chosen block and denoiser call: the image tokens' attention output BEFORE
the output projection, heads concatenated (O_img, N x D), against the concepts' (O_c,
C x D): softmax over concepts of O_img O_c^T, averaged over chosen layers and calls. The
"cross-attention" baseline from the same pass: per-head q_img k_c^T / sqrt(d), averaged
over heads, softmax over concepts.

    with concept_attention(pipe, ["circle", "square", "background"]) as ca:
        image = pipe("a red circle and a blue square").images[0]
    maps = ca.maps()            # (batch, concepts, h, w) on the image-token grid
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RevelioError
from .hooks import ConditionalRows, HookSession, captured, hooked, swapped_processors
from .mmdit import denoiser_input, encode_concepts, image_heads, joint_adapter, resolve_concept_options, text_heads


def check_concepts(concepts: Sequence[str]) -> list[str]:
    """Refuse empty concept lists, empty and duplicate concepts."""
    concepts = [str(c).strip() for c in concepts]
    if not concepts:
        raise RevelioError("the concept list is empty; pass at least one concept word, e.g. ['dog', 'background']")
    if any(not c for c in concepts):
        raise RevelioError(f"empty concept in {concepts}")
    dup = sorted({c for c in concepts if concepts.count(c) > 1})
    if dup:
        raise RevelioError(f"duplicate concepts {dup}")
    return concepts


class _ConceptProcessor:
    """Runs the block's original processor, then the concepts' attention and their residual update."""

    def __init__(self, inner, tracer: "ConceptAttention", index: int, block: nn.Module):
        self.inner, self.tracer, self.index, self.block = inner, tracer, index, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        extra = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        with captured(q=attn.to_q, k=attn.to_k, v=attn.to_v, in_o=attn.to_out[0]) as cap:
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **extra, **kwargs)
        if self.tracer._rows is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        self.tracer._block(self.index, self.block, attn, cap, image_rotary_emb, text_len)
        return out


class ConceptAttention(HookSession):
    """Context manager tracing ConceptAttention (and the DiT cross-attention baseline) over denoiser calls.

    ``layers``: indices of the double-stream blocks whose maps are averaged (None: all;
    negative indices count from the end). ``steps``: indices of the denoiser calls that
    count (None: all). The concept stream itself runs through every block at every call.
    ``cfg``: see :class:`~revelio.saliency.hooks.ConditionalRows` (None: detect).
    ``baseline``: also accumulate the cross-attention baseline (``cross_attention_maps()``).
    ``encoding``: "reference" | "first_token" | "joined" (SD3) | "mean" (see ``mmdit.encode_concepts``).
    ``modulation``: which pooled text vector builds the ``temb`` of the concepts' adaptive norms:
    "reference" | "zero_pooled" (a zero vector, as the reference's Flux code) | "prompt" (the prompt's,
    i.e. the block's own ``temb``, as the reference's SD3 code).
    """

    def __init__(self, pipe, concepts: Sequence[str], layers: Sequence[int] | None = None,
                 steps: Sequence[int] | None = None, cfg: bool | None = None, baseline: bool = False,
                 encoding: Literal["reference", "first_token", "joined", "mean"] = "reference",
                 modulation: Literal["reference", "zero_pooled", "prompt"] = "reference"):
        self.adapter = joint_adapter(pipe)
        self.kind = self.adapter.kind
        self.concepts = check_concepts(concepts)
        self.encoding, self.modulation = resolve_concept_options(self.kind, encoding, modulation)
        self.pipe = pipe
        self.blocks = self.adapter.joint_blocks()
        n = len(self.blocks)
        if layers is not None:
            bad = [i for i in layers if not -n <= i < n]
            if bad:
                raise RevelioError(f"layers {bad} out of range: this model has {n} double-stream blocks (0..{n - 1})")
            self.layers = sorted({i % n for i in layers})
        else:
            self.layers = list(range(n))
        self.steps = None if steps is None else set(steps)
        self._conditional = ConditionalRows(cfg)
        self.baseline = baseline
        self.reset()

    def reset(self) -> None:
        """Forget accumulated maps (keeps the hooks)."""
        self._sum: torch.Tensor | None = None
        self._cross: torch.Tensor | None = None
        self._count = 0
        self.calls = 0
        self.grid: tuple[int, int] | None = None
        self._rows: slice | None = None
        self._active = False

    # -- context manager --------------------------------------------------------------------
    def _install(self, stack: ExitStack) -> None:
        den = self.adapter.denoiser
        embeds, self._lead = encode_concepts(self.pipe, self.kind, self.concepts, self.encoding)
        self._embeds = embeds.to(den.dtype)
        stack.enter_context(hooked(den, pre=self._on_call, with_kwargs=True))
        if self.modulation == "zero_pooled":
            stack.enter_context(hooked(den.time_text_embed, post=self._zero_pooled_temb, with_kwargs=True))
        for i, b in enumerate(self.blocks):
            stack.enter_context(hooked(b, pre=self._temb_hook(i), with_kwargs=True))
        modules = {str(i): b.attn for i, b in enumerate(self.blocks)}
        stack.enter_context(swapped_processors(
            modules, lambda name, m, orig: _ConceptProcessor(orig, self, int(name), self.blocks[int(name)])))

    # -- hooks ------------------------------------------------------------------------------
    def _on_call(self, module, args, kwargs):
        x = denoiser_input(args, kwargs)
        self._rows = self._conditional.rows(x, kwargs.get("encoder_hidden_states"))
        if self._rows is None:  # classifier-free guidance's unconditional call: no concept stream
            return
        b = len(range(*self._rows.indices(x.shape[0])))
        self.grid = self.adapter.token_grid(args, kwargs)
        self._active = self.steps is None or self.calls in self.steps
        self.calls += 1
        with torch.no_grad():
            c = module.context_embedder(self._embeds.to(x.device))
        self._stream = c.unsqueeze(0).expand(b, -1, -1).contiguous()
        self._temb: dict[int, torch.Tensor] = {}

    def _zero_pooled_temb(self, module, args, kwargs, _out):
        """The same timestep (and guidance) embedding with the pooled text vector set to zero."""
        if self._rows is None or getattr(self, "_in_zero", False):
            return
        args, kwargs = list(args), dict(kwargs)
        if "pooled_projection" in kwargs:
            kwargs["pooled_projection"] = torch.zeros_like(kwargs["pooled_projection"])
        else:
            args[-1] = torch.zeros_like(args[-1])
        self._in_zero = True
        try:
            with torch.no_grad():
                self._zero_temb = module(*args, **kwargs)
        finally:
            self._in_zero = False

    def _temb_hook(self, i: int):
        def hook(_m, args, kwargs):
            temb = kwargs["temb"] if "temb" in kwargs else args[2]
            self._temb[i] = temb
        return hook

    # -- the method ---------------------------------------------------------------------------
    @torch.no_grad()
    def _block(self, i: int, block: nn.Module, attn: nn.Module, cap: dict, rotary, text_len: int) -> None:
        if not self._active or i > self.layers[-1]:
            return  # an uncounted call, or past the last scored block: the concept stream is not needed
        rows = self._rows
        temb = (self._temb[i] if self.modulation == "prompt" else self._zero_temb)[rows]
        scoring = i in self.layers
        names = ("q", "k", "v") if scoring and self.baseline else ("k", "v")
        img = image_heads(attn, {k: cap[k][rows] for k in names}, self.adapter, rotary, text_len, names=names)
        c = self._stream
        pre_only = getattr(block, "context_pre_only", False)
        if pre_only:
            norm_c = block.norm1_context(c, temb)
        else:
            norm_c, g_msa, shift_mlp, scale_mlp, g_mlp = block.norm1_context(c, emb=temb)
        con = text_heads(attn, norm_c, self.kind, rotary, text_position=0)
        keys = torch.cat([con["k"], img["k"]], dim=1).transpose(1, 2)
        values = torch.cat([con["v"], img["v"]], dim=1).transpose(1, 2)
        o_c = F.scaled_dot_product_attention(con["q"].transpose(1, 2), keys, values)  # (B, H, C, d)
        o_c = o_c.transpose(1, 2).flatten(2)  # heads concatenated, before the output projection
        if scoring:
            lead = self._lead  # leading stream tokens without a map ("joined": CLIP's start token)
            o_img = cap["in_o"][rows]
            cross = None
            if self.baseline:
                cross = torch.einsum("bnhd,bchd->bnc", img["q"].float(), con["k"][:, lead:].float()) \
                    .div(attn.heads * img["q"].shape[-1] ** 0.5).softmax(-1)
            self._add(torch.einsum("bnd,bcd->bnc", o_img.float(), o_c[:, lead:].float()).softmax(-1), cross)
        if not pre_only:
            c = c + g_msa.unsqueeze(1) * attn.to_add_out(o_c)
            h = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            self._stream = c + g_mlp.unsqueeze(1) * block.ff_context(h)

    def _add(self, concept: torch.Tensor, cross: torch.Tensor | None) -> None:
        if self._sum is None:
            self._sum = torch.zeros_like(concept)
            self._cross = None if cross is None else torch.zeros_like(cross)
        if self._sum.shape != concept.shape:
            raise RevelioError(f"the batch or resolution changed within one trace ({tuple(self._sum.shape)} -> "
                               f"{tuple(concept.shape)}); use one trace per batch or call reset()")
        self._sum += concept
        if cross is not None:
            self._cross += cross
        self._count += 1

    # -- results ------------------------------------------------------------------------------
    def _grid(self, acc: torch.Tensor | None) -> torch.Tensor:
        if acc is None:
            raise RevelioError("no maps recorded: run the pipeline (or a denoiser call) inside the `with` block, "
                               "and check `layers`/`steps`")
        h, w = self.grid
        return (acc / self._count).transpose(1, 2).reshape(acc.shape[0], len(self.concepts), h, w)

    def maps(self) -> torch.Tensor:
        """ConceptAttention maps (batch, concepts, h, w) on the image-token grid; each pixel sums to 1 over concepts."""
        return self._grid(self._sum)

    def cross_attention_maps(self) -> torch.Tensor:
        """The DiT cross-attention baseline (q_img k_concept^T) from the same pass, same shape (needs ``baseline``)."""
        if not self.baseline:
            raise RevelioError("cross-attention maps were not recorded: create the trace with baseline=True")
        return self._grid(self._cross)


def concept_attention(pipe, concepts: Sequence[str], layers: Sequence[int] | None = None,
                      steps: Sequence[int] | None = None, cfg: bool | None = None,
                      baseline: bool = False, encoding: str = "reference",
                      modulation: str = "reference") -> ConceptAttention:
    """``with concept_attention(pipe, concepts) as ca: pipe(prompt)`` then ``ca.maps()``; see :class:`ConceptAttention`."""
    return ConceptAttention(pipe, concepts, layers=layers, steps=steps, cfg=cfg, baseline=baseline,
                            encoding=encoding, modulation=modulation)
