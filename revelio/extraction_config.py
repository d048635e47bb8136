"""The config of ``revelio extract`` and how it runs.

``ExtractConfig`` is the extraction stage's plan (``extraction.config.ExtractionPlan``: every key, its one
default, the identity and provenance a store records) with its ``model`` and ``data`` sections typed as what
the CLI loads: a zoo / hub pipeline (``ModelConfig``) and one of revelio's data sets (``DataConfig``). It sits
below the command layer, so ``revelio.analysis`` can rebuild the config a store was written with (and the
notebooks' quick start can extract) without importing ``revelio.commands``. Light: no torch until ``extract``
runs (``revelio extract --help`` starts at once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from extraction.config import NON_IDENTITY, ExtractionPlan

from .config import field
from .datasets import DataConfig


@dataclass
class ModelConfig:
    id: str = field("tiny-sd", help="zoo name (tiny-sd, tiny-flux, tiny-sd3), local pipeline folder or hub id")
    dtype: Literal["float32", "float16", "bfloat16"] = field("float32", help="compute dtype of the pipeline: float32 | float16 | bfloat16")
    device: str = field("cpu", help="torch device: cpu | cuda | cuda:1 | mps (under torchrun 'cuda' means cuda:LOCAL_RANK)")


@dataclass
class ExtractConfig(ExtractionPlan):
    """``revelio extract``'s config: the extraction plan, with the pipeline and the data set the CLI loads."""

    model: ModelConfig = field(default_factory=ModelConfig, help="")
    data: DataConfig = field(default_factory=DataConfig, help="")


def extract(cfg: ExtractConfig) -> Any:
    """Cache hooked activations of real images (noised to each timestep, one denoiser call) to an HDF5 store."""
    from extraction.run import Extractor, run_extraction

    from .datasets import load_dataset
    from .zoo import load_pipeline

    cfg.validate()
    device = cfg.model.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local rank
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    pipe = load_pipeline(cfg.model.id, device=device, dtype=cfg.model.dtype)
    extractor = Extractor(pipe, cfg)  # wrong hook names fail here, before the data set is touched
    return run_extraction(extractor, load_dataset(cfg.data))


__all__ = ["NON_IDENTITY", "ExtractConfig", "ModelConfig", "extract"]
