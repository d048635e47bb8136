"""Saliency on a real image: encode it, noise it to timestep t, run ONE denoiser call with its caption.

The model-specific steps (VAE encoding, noising, prompt encoding, the call itself) are the
extraction adapters'; a trace around the call records the maps exactly as during
generation. Several noise seeds are several calls inside the same trace, so their maps
are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from extraction.adapters import get_adapter

from ..config import RevelioError
from .concept_attention import ConceptAttention
from .daam import DAAMTrace


@torch.no_grad()
def forward_on_images(pipe, images: Sequence[Image.Image], captions: Sequence[str], t: int, seeds: Sequence[int],
                      size: int) -> None:
    """One denoiser call per seed on ``images`` noised to integer timestep ``t`` (in [0, 1000))."""
    if len(images) != len(captions):
        raise RevelioError(f"got {len(images)} images but {len(captions)} captions")
    if not seeds:
        raise RevelioError("no noise seeds given; pass at least one, e.g. [0]")
    ad = get_adapter(pipe)
    latents = ad.encode_images(ad.preprocess(list(images), size))
    cond = ad.encode_prompts(list(captions))
    for seed in seeds:
        ad.forward(ad.noise(latents, t, torch.Generator("cpu").manual_seed(int(seed))), t, cond)


def daam_on_images(pipe, images: Sequence[Image.Image], captions: Sequence[str], t: int = 500,
                   seeds: Sequence[int] = (0,), size: int = 512, include_mid: bool = False,
                   order: str = "reference") -> DAAMTrace:
    """DAAM maps of a real image batch; query words with ``.word_map(word, index)``."""
    tc = DAAMTrace(pipe, include_mid=include_mid, cfg=False, order=order)
    with tc:
        forward_on_images(pipe, images, captions, t, seeds, size)
    return tc


def concept_attention_on_images(pipe, images: Sequence[Image.Image], concepts: Sequence[str],
                                captions: Sequence[str] | None = None, t: int = 500, seeds: Sequence[int] = (0,),
                                size: int = 512, layers: Sequence[int] | None = None,
                                baseline: bool = False, encoding: str = "reference",
                                modulation: str = "reference") -> ConceptAttention:
    """ConceptAttention (and optionally the cross-attention baseline) maps of a real image batch; ``.maps()`` after."""
    ca = ConceptAttention(pipe, concepts, layers=layers, cfg=False, baseline=baseline, encoding=encoding,
                          modulation=modulation)
    with ca:
        forward_on_images(pipe, images, list(captions) if captions is not None else [""] * len(images), t, seeds,
                          size)
    return ca
