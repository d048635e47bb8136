"""What saliency needs to know about MM-DiT pipelines (Flux, SD3): blocks, token grid, heads, concept encoding."""

from __future__ import annotations

import torch
from torch import nn

from extraction.adapters import MMDiTAdapter, call_input, get_adapter

from ..config import RevelioError


class UnsupportedPipeline(RevelioError, TypeError):
    """The pipeline's denoiser does not fit the method; the message names the method that does."""


def joint_adapter(pipe) -> MMDiTAdapter:
    """The pipeline's adapter when it is an MM-DiT (Flux, SD3); a clear error naming the right method otherwise."""
    ad = get_adapter(pipe)
    if isinstance(ad, MMDiTAdapter):
        return ad
    if ad.cross_attention == "separate":
        raise UnsupportedPipeline(
            f"{type(pipe).__name__} has separate cross-attention between image and text ({ad.kind}), not MM-DiT "
            f"double-stream blocks: use DAAM (revelio.saliency.trace, method 'daam') for it. ConceptAttention "
            f"needs Flux or SD3.")
    raise UnsupportedPipeline(f"{type(pipe).__name__}: ConceptAttention and DiT cross-attention need an MM-DiT "
                              f"pipeline (FluxPipeline, StableDiffusion3Pipeline)")


def denoiser_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The latent input of a denoiser call (``sample`` for UNets, ``hidden_states`` for transformers): the adapters'
    ``call_input``, failing as a RevelioError."""
    try:
        return call_input(args, kwargs)
    except TypeError as e:
        raise RevelioError(str(e)) from None


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, heads*d) -> (B, S, heads, d)."""
    return x.unflatten(-1, (heads, -1))


def rotate(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, rows: slice | None) -> torch.Tensor:
    """Flux's rotary embedding on (B, S, H, d) for the given rows of the joint sequence (no-op without rotary)."""
    if rotary is None:
        return x
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rotary
    cos, sin = cos[rows], sin[rows]
    if cos.shape[0] == 1 and x.shape[1] != 1:
        cos, sin = cos.expand(x.shape[1], -1), sin.expand(x.shape[1], -1)
    return apply_rotary_emb(x, (cos, sin), sequence_dim=1)


def image_heads(attn: nn.Module, cap: dict[str, torch.Tensor], ad: MMDiTAdapter, rotary, text_len: int,
                names: tuple[str, ...] = ("q", "k", "v")) -> dict[str, torch.Tensor]:
    """Image-token q/k/v of one joint attention call from captured projections: (B, N, H, d), q/k normed and rotated."""
    missing = [n for n in names if n not in cap]
    if missing:
        raise RevelioError(f"{type(attn).__name__}: projections {missing} were not called (fused QKV projections are "
                           f"not supported; call unfuse_qkv_projections() first)")
    heads = attn.heads
    out = {}
    for n in names:
        x = split_heads(cap[n], heads)
        if n in ("q", "k"):
            norm = attn.norm_q if n == "q" else attn.norm_k
            if norm is not None:
                x = norm(x)
            x = rotate(x, rotary, ad.image_rows(text_len, x.shape[1]))
        out[n] = x
    return out


def text_heads(attn: nn.Module, text: torch.Tensor, kind: str, rotary, names: tuple[str, ...] = ("q", "k", "v"),
               text_position: int | None = None) -> dict[str, torch.Tensor]:
    """Text-stream q/k/v of already-normalised text-stream tokens (B, T, D) -> (B, T, H, d), q/k normed, rotated.

    With ``text_position`` every token takes the rotary embedding of that text position
    (concept tokens: position 0, which Flux gives every prompt token); otherwise the
    tokens are the prompt and take their own rows.
    """
    proj = {"q": attn.add_q_proj, "k": attn.add_k_proj, "v": attn.add_v_proj}
    norms = {"q": attn.norm_added_q, "k": attn.norm_added_k}
    out = {}
    for n in names:
        x = split_heads(proj[n](text), attn.heads)
        if n in norms and norms[n] is not None:
            x = norms[n](x)
        if n in norms and rotary is not None:
            t0 = 0 if text_position is None else text_position
            rows = slice(t0, t0 + 1) if text_position is not None else slice(0, x.shape[1])
            x = rotate(x, rotary, rows)
        out[n] = x
    return out


CONCEPT_ENCODINGS = ("reference", "first_token", "joined", "mean")
CONCEPT_MODULATIONS = ("reference", "zero_pooled", "prompt")


def resolve_concept_options(kind: str, encoding: str, modulation: str) -> tuple[str, str]:
    """Replace "reference" by what the reference code does for this model kind; refuse unknown choices.

    The reference's Flux code encodes each concept alone and keeps its first T5 token, and builds the
    concept stream's modulation from a ZERO pooled text vector; its SD3 code encodes the joined
    concepts as one prompt and modulates the concepts with the prompt's own ``temb``.
    """
    if encoding not in CONCEPT_ENCODINGS:
        raise RevelioError(f"concept encoding {encoding!r} is not one of {list(CONCEPT_ENCODINGS)}")
    if modulation not in CONCEPT_MODULATIONS:
        raise RevelioError(f"concept modulation {modulation!r} is not one of {list(CONCEPT_MODULATIONS)}")
    if encoding == "reference":
        encoding = "first_token" if kind == "flux" else "joined"
    if modulation == "reference":
        modulation = "zero_pooled" if kind == "flux" else "prompt"
    if encoding == "joined" and kind != "sd3":
        raise RevelioError("concept encoding 'joined' is the reference's SD3 encoding (its first token is CLIP's "
                           "start token); for Flux use 'first_token' or 'mean'")
    return encoding, modulation


def _t5(pipe):
    tok, encoder = get_adapter(pipe).word_encoder()
    if encoder is None:
        raise RevelioError("ConceptAttention encodes concepts with the pipeline's T5 encoder, which this pipeline "
                           "was loaded without")
    return tok, encoder


@torch.no_grad()
def encode_concepts(pipe, kind: str, concepts: list[str], encoding: str = "mean") -> tuple[torch.Tensor, int]:
    """Concept tokens before ``context_embedder``: ((C + lead, joint_attention_dim), lead).

    ``lead`` leading tokens ride along in the concept stream but get no map (1 for "joined", else 0).

    - "first_token" (the reference's Flux code): each concept is a prompt ON ITS OWN through the T5
      prompt encoder (Flux's prompt tokens; the T5 part of SD3's text sequence), padded like prompts to
      the tokenizer's maximum length (at most 512) without attention mask; its first output token.
    - "joined" (the reference's SD3 code; SD3 only): the concepts joined by spaces are ONE prompt through
      the pipeline's ``encode_prompt`` (CLIP-L | CLIP-G, zero-padded, then T5); the first C + 1 tokens of
      that sequence (CLIP's start token and the next C tokens) form the stream, the start token unscored.
      The i-th concept is the i-th CLIP token, so this lines up only when each concept is one token.
    - "mean": each concept on its own through T5, padded to the longest concept + 1 of the list; the
      MEAN of its tokens' outputs (end-of-sequence and padding excluded), so multi-token concepts keep
      every piece. T5 runs without attention mask (as the pipelines do), so the padding length, hence
      the concept list, still changes an embedding slightly.
    """
    if encoding == "joined":
        n_clip = getattr(pipe, "tokenizer_max_length", 77)
        if len(concepts) + 1 > n_clip:
            raise RevelioError(f"concept encoding 'joined' keeps the first C + 1 = {len(concepts) + 1} CLIP tokens, "
                               f"more than CLIP's {n_clip}")
        embeds = get_adapter(pipe).encode_prompts([" ".join(concepts)])["encoder_hidden_states"]
        return embeds[0, : len(concepts) + 1], 1
    tok, encoder = _t5(pipe)
    if encoding == "first_token":
        length = min(int(tok.model_max_length), 512)
        ids = tok(concepts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        return encoder(ids.to(encoder.device))[0][:, 0], 0
    counts = [max(1, len(tok(c, add_special_tokens=False).input_ids)) for c in concepts]
    length = max(counts) + 1  # + end of sequence
    # The pipelines' own T5 path (``_get_t5_prompt_embeds``): padded ids, no attention mask.
    ids = tok(concepts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    out = encoder(ids.to(encoder.device))[0]
    return torch.stack([out[i, :k].mean(0) for i, k in enumerate(counts)]), 0
