"""The config of ``revelio extract`` and how it runs: below the command layer, so ``revelio.analysis`` can rebuild
the config a store was written with (and the notebooks' quick start can extract) without importing
``revelio.commands``. Light: no torch until ``extract`` runs (``revelio extract --help`` starts at once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from .config import field, to_dict
from .datasets import DataConfig


@dataclass
class ModelConfig:
    id: str = field("tiny-sd", help="zoo name (tiny-sd, tiny-flux, tiny-sd3), local pipeline folder or hub id")
    dtype: Literal["float32", "float16", "bfloat16"] = field("float32", help="compute dtype of the pipeline: float32 | float16 | bfloat16")
    device: str = field("cpu", help="torch device: cpu | cuda | cuda:1 | mps (under torchrun 'cuda' means cuda:LOCAL_RANK)")


@dataclass
class ExtractConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="")
    data: DataConfig = field(default_factory=DataConfig, help="")
    hooks: list[str] = field(default_factory=lambda: ["mid_block", "up_blocks.1"],
                             nonempty=True, help="denoiser module names to hook (e.g. mid_block, up_blocks.1, transformer_blocks.3)")
    timesteps: list[int] = field(default_factory=lambda: [25], nonempty=True, min=0, max=999, help="noise timesteps in [0, 1000), one forward each")
    capture: Literal["output", "input", "delta"] = field("output", help="output | input | delta (output - input)")
    pooling: Literal["none", "mean"] = field("none", help="none (keep maps / image tokens) | mean (spatial mean, layout NC)")
    prompt: Literal["empty", "caption", "template"] = field("empty", help="empty | caption | template")
    template: str = field("a photo of a {label}", help="prompt for prompt=template; {label} name, {label_id} int")
    batch_size: int = field(16, min=1, help="images per denoiser call")
    storage_dtype: Literal["float16", "float32"] = field("float16", help="float16 | float32 on disk")
    compression: Literal["none", "gzip", "lzf"] = field("none", help="none | gzip | lzf (chunk compression; none is fastest and crash-safest)")
    seed: int = field(0, help="noise seed; noise depends on (seed, image id, timestep) only")
    out: str = field("runs/activations.h5", help="output HDF5 store (resumed when it exists with the same config)")
    progress: bool = field(True, help="show a progress bar")


# Keys that do not change the stored data: changing them lets a run resume the same file.
NON_IDENTITY = ("batch_size", "out", "progress")


def plan_from_config(cfg: ExtractConfig) -> Any:
    """The extraction stage's plan for ``cfg`` (provenance and identity included)."""
    from extraction.run import ExtractionPlan

    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("revelio-diffusion")
    except PackageNotFoundError:
        pkg_version = "unknown"
    full = to_dict(cfg)
    identity = {k: v for k, v in full.items() if k not in NON_IDENTITY}
    identity["model"] = {k: v for k, v in full["model"].items() if k != "device"}
    return ExtractionPlan(
        hooks=list(cfg.hooks), timesteps=[int(t) for t in cfg.timesteps], out=cfg.out, capture=cfg.capture,
        pooling=cfg.pooling, prompt=cfg.prompt, template=cfg.template, size=cfg.data.size, batch_size=cfg.batch_size,
        storage_dtype=cfg.storage_dtype, compression=cfg.compression, seed=cfg.seed, progress=cfg.progress,
        provenance={"model": cfg.model.id, "dataset": cfg.data.name, "config": full, "package_version": pkg_version},
        identity=identity)


def extract(cfg: ExtractConfig) -> Any:
    """Cache hooked activations of real images (noised to each timestep, one denoiser call) to an HDF5 store."""
    from extraction.run import Extractor, run_extraction

    from .datasets import load_dataset
    from .zoo import load_pipeline

    plan = plan_from_config(cfg)
    plan.validate()
    device = cfg.model.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local rank
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    pipe = load_pipeline(cfg.model.id, device=device, dtype=cfg.model.dtype)
    extractor = Extractor(pipe, plan)  # wrong hook names fail here, before the data set is touched
    return run_extraction(extractor, load_dataset(cfg.data))
