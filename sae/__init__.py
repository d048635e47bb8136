"""k-sparse autoencoders on diffusion activations: the model, its Lightning training and its files.

``sae.load(folder)`` reads an SAE folder; ``sae.fit_from_store(store, hook, timestep, out_dir)``
trains one from an activation store; ``sae.SAEConfig`` (``sae/config.py``) is the SAE's config, which
``cfg.json`` records. The stage reads activations only through ``extraction.store``.

The names are imported on first use, so ``sae.config`` (read by ``revelio sae fit --help``) loads without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {"load": "io", "read_config": "io", "save": "io", "Codes": "model", "SparseAutoencoder": "model",
         "fvu": "model", "geometric_median": "model", "SAEConfig": "config"}
_SUBMODULES = ("config", "data", "io", "lightning", "logs", "metrics", "model", "train")

__all__ = ["Codes", "SAEConfig", "SparseAutoencoder", "fit_from_store", "fvu", "geometric_median", "load",
           "read_config", "save"]


def fit_from_store(store_path, hook: str, timestep: int, out_dir, **kw):
    """Train an SAE on one (hook, timestep) of a store and export it to ``out_dir``; see ``sae.train.fit_from_store``."""
    from .train import fit_from_store as _fit

    return _fit(store_path, hook, timestep, out_dir, **kw)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:  # ``import sae; sae.io.X`` as before, when the names were imported eagerly
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
