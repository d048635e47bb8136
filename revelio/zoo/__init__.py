"""The model loader: a zoo name (``tiny-sd``, ``tiny-flux``, ``tiny-sd3``), a local folder or a hub id.

Zoo models are real diffusers pipelines with tiny configs. Trained weights shipped in
``revelio/zoo/weights/<name>`` are used when present; otherwise a seeded random-init
pipeline is built once, saved with ``save_pretrained`` under the cache folder
(``$REVELIO_HOME``, default ``~/.cache/revelio``) and loaded back with
``from_pretrained``, exactly like a hub model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import RevelioError

if TYPE_CHECKING:
    import torch

# Zoo name -> builder function in ``builders.py``. Named, not imported: importing torch and
# diffusers here would make every `revelio ... --help` pay for them (see cli.py).
BUILDERS: dict[str, str] = {
    "tiny-sd": "build_tiny_sd",
    "tiny-flux": "build_tiny_flux",
    "tiny-sd3": "build_tiny_sd3",
}
ZOO_NAMES = list(BUILDERS)


def build(name: str, seed: int = 0):
    """A fresh seeded random-init pipeline of zoo model ``name``."""
    from . import builders

    return getattr(builders, BUILDERS[name])(seed)
WEIGHTS_DIR = Path(__file__).parent / "weights"


class ModelUnavailable(RevelioError, RuntimeError):
    """The model cannot be loaded here; the message says what to pass instead."""


def quiet_libraries() -> None:
    """Silence the per-component loading bars and notices of diffusers/transformers (errors still show)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cache_dir() -> Path:
    return Path(os.environ.get("REVELIO_HOME", Path.home() / ".cache" / "revelio"))


def shipped_path(name: str) -> Path | None:
    """The folder of trained weights shipped in the package for zoo model ``name``, if any."""
    p = WEIGHTS_DIR / name
    return p if (p / "model_index.json").exists() else None


def zoo_path(name: str, random_init: bool = False, seed: int = 0) -> Path:
    """The folder holding zoo model ``name``: shipped trained weights, else a cached random build."""
    if name not in BUILDERS:
        raise ModelUnavailable(f"{name!r} is not a zoo model; zoo models: {', '.join(ZOO_NAMES)}")
    if not random_init and (p := shipped_path(name)) is not None:
        return p
    target = cache_dir() / "zoo" / f"{name}-random-seed{seed}"
    if not (target / "model_index.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        from extraction.files import atomic_path

        with atomic_path(target, folder=True) as tmp:  # a crash never leaves a half-written model folder
            build(name, seed).save_pretrained(tmp)
    return target


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(table)}")
    return table[dtype]


def load_pipeline(model: str, device: str = "cpu", dtype: str | torch.dtype = "float32", random_init: bool = False,
                  seed: int = 0, allow_network: bool | None = None):
    """Load a diffusers pipeline from a zoo name, a local folder or a hub id.

    Nothing is downloaded unless ``allow_network`` is true (default: only when
    ``HF_HUB_OFFLINE`` is unset and ``REVELIO_ALLOW_NETWORK=1``).
    """
    from diffusers import DiffusionPipeline

    quiet_libraries()
    torch_dtype = resolve_dtype(dtype)
    if model in BUILDERS:
        path, local_only = zoo_path(model, random_init=random_init, seed=seed), True
    elif Path(model).exists():
        path, local_only = Path(model), True
    else:
        if allow_network is None:
            allow_network = os.environ.get("REVELIO_ALLOW_NETWORK") == "1" and os.environ.get("HF_HUB_OFFLINE") != "1"
        path, local_only = model, not allow_network
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), dtype=torch_dtype, local_files_only=local_only)
    except (OSError, ValueError, EnvironmentError) as e:
        if local_only and not Path(str(path)).exists():
            raise ModelUnavailable(
                f"model {model!r} is not available offline. Pass a zoo name ({', '.join(ZOO_NAMES)}), a local folder "
                f"saved with save_pretrained, or a hub id whose weights are in the local Hugging Face cache; to allow "
                f"downloads set REVELIO_ALLOW_NETWORK=1 and unset HF_HUB_OFFLINE.") from e
        raise
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generation_kwargs(pipe, guidance_scale: float | None = None, batch: int = 1) -> dict:
    """Keyword arguments for ``pipe(prompts, **kw)`` that fit the pipeline family: the adapter's answer.

    See ``extraction.adapters.Adapter.generation_kwargs``: the T5 length the model's tokenizer
    declares when shorter than the pipeline's default (the zoo models were trained on 32 tokens),
    and ``guidance_scale`` > 1 as classifier-free guidance against the empty prompt (Flux models
    without a guidance embedding, e.g. tiny-flux and FLUX.1-schnell: diffusers' true CFG).
    """
    from extraction.adapters import get_adapter

    return get_adapter(pipe).generation_kwargs(guidance_scale, batch=batch)
