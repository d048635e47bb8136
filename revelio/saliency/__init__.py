"""Saliency for diffusion models: DAAM (UNets, and DiT cross-attention) and ConceptAttention (MM-DiTs).

Both are context managers around an ordinary pipeline call (or one denoiser call on a real
image, see :mod:`revelio.saliency.real_image`) that swap diffusers attention processors and
put the originals back on exit.
"""

from .concept_attention import ConceptAttention, concept_attention
from .daam import DAAMTrace, trace
from .mmdit import UnsupportedPipeline
from .words import WordNotInPrompt

__all__ = ["trace", "DAAMTrace", "concept_attention", "ConceptAttention", "UnsupportedPipeline", "WordNotInPrompt"]
