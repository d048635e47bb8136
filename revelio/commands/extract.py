"""``revelio extract``: cache per-layer, per-timestep activations of a diffusion model to HDF5.

The config and the run live in ``revelio/extraction_config.py`` (below the commands, so analysis can use them).
"""

from __future__ import annotations

from typing import Any

from ..cli import command
from ..extraction_config import NON_IDENTITY, ExtractConfig, ModelConfig, extract, plan_from_config

__all__ = ["NON_IDENTITY", "ExtractConfig", "ModelConfig", "extract_cmd", "plan_from_config"]


@command("extract", ExtractConfig)
def extract_cmd(cfg: ExtractConfig) -> Any:
    """Cache hooked activations of real images (noised to each timestep, one denoiser call) to an HDF5 store."""
    return extract(cfg)
