"""k-sparse autoencoders on diffusion activations: the model, its Lightning training and its files.

``sae.load(folder)`` reads an SAE folder; ``sae.fit_from_store(store, hook, timestep, out_dir)``
trains one from an activation store. The stage reads activations only through ``extraction.store``.
"""

from .io import load, read_config, save
from .model import Codes, SparseAutoencoder, fvu, geometric_median

__all__ = ["Codes", "SparseAutoencoder", "fit_from_store", "fvu", "geometric_median", "load", "read_config", "save"]


def fit_from_store(store_path, hook: str, timestep: int, out_dir, **kw):
    """Train an SAE on one (hook, timestep) of a store and export it to ``out_dir``; see ``sae.train.fit_from_store``."""
    from .train import fit_from_store as _fit

    return _fit(store_path, hook, timestep, out_dir, **kw)
