"""``revelio extract``: cache per-layer, per-timestep activations of a diffusion model to HDF5.

The config is the extraction stage's plan (``extraction/config.py``), with the model and data-set sections
of ``revelio/extraction_config.py`` (below the commands, so analysis can use it).
"""

from __future__ import annotations

from typing import Any

from ..cli import command
from ..extraction_config import NON_IDENTITY, ExtractConfig, ModelConfig, extract

__all__ = ["NON_IDENTITY", "ExtractConfig", "ModelConfig", "extract_cmd"]


@command("extract", ExtractConfig)
def extract_cmd(cfg: ExtractConfig) -> Any:
    """Cache hooked activations of real images (noised to each timestep, one denoiser call) to an HDF5 store."""
    return extract(cfg)
