"""Probes: how much label information each layer and timestep of a diffusion model holds.

scikit-learn-style estimators (``fit``/``predict``/``score``) on image-level features read through
``extraction.store``: ``LinearProbe`` (standardised logistic regression, C by cross-validation),
``KSparseProbe`` (the k latents whose class means differ most), ``StreamingLinearProbe`` (a
torch/Lightning head streaming from the HDF5 store). ``sweep`` runs them over a whole store,
``monosemanticity`` scores SAE latents by the labels of their top images.
"""

from ._checks import DEFAULT_CS, ProbeError
from .evaluate import chance_accuracy, evaluate, macro_f1, sparse_probing
from .features import (colour_histogram, labelled_rows, mean_colour, pooled_features, random_features, sae_codes,
                       sae_key)
from .mono import auroc_matrix, label_purity_entropy, monosemanticity, top_rows
from .splits import Split, make_splits, stratified_folds, stratified_split
from .sweep import PIXEL_BASELINES, baseline_verdict, sweep

# Names whose modules import scikit-learn or torch load on first use, so importing probes stays light
# (the CLI's --help reads DEFAULT_CS through it).
_LAZY = {
    "LinearProbe": "linear",
    "KSparseProbe": "sparse", "default_ks": "sparse", "mean_difference_scores": "sparse", "top_k_features": "sparse",
    "StoreSource": "streaming", "StreamingLinearProbe": "streaming", "evaluate_streaming": "streaming",
    "streaming_moments": "streaming",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")


__all__ = ["DEFAULT_CS", "PIXEL_BASELINES", "KSparseProbe", "LinearProbe", "ProbeError", "Split", "StoreSource",
           "StreamingLinearProbe", "auroc_matrix", "baseline_verdict", "chance_accuracy", "colour_histogram",
           "default_ks", "evaluate", "evaluate_streaming", "label_purity_entropy", "labelled_rows", "macro_f1",
           "make_splits", "mean_colour", "mean_difference_scores", "monosemanticity", "pooled_features",
           "random_features", "sae_codes", "sae_key", "sparse_probing", "stratified_folds", "stratified_split",
           "streaming_moments", "sweep", "top_k_features", "top_rows"]
