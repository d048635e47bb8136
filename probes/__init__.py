"""Probes: how much label information each layer and timestep of a diffusion model holds.

scikit-learn-style estimators (``fit``/``predict``/``score``) on image-level features read through
``extraction.store``: ``LinearProbe`` (standardised logistic regression, C by cross-validation),
``KSparseProbe`` (the k latents whose class means differ most), ``StreamingLinearProbe`` (a
torch/Lightning head streaming from the HDF5 store). ``sweep`` runs them over a whole store,
``monosemanticity`` scores SAE latents by the labels of their top images.
"""

from ._checks import ProbeError
from .evaluate import chance_accuracy, evaluate, macro_f1, sparse_probing
from .features import (colour_histogram, labelled_rows, mean_colour, pooled_features, random_features, sae_codes,
                       sae_key)
from .linear import DEFAULT_CS, LinearProbe
from .mono import auroc_matrix, label_purity_entropy, monosemanticity, top_rows
from .sparse import KSparseProbe, default_ks, mean_difference_scores, top_k_features
from .splits import Split, make_splits, stratified_folds, stratified_split
from .sweep import PIXEL_BASELINES, baseline_verdict, sweep

_STREAMING = ("StoreSource", "StreamingLinearProbe",
           "evaluate_streaming", "evaluate_streaming", "streaming_moments")


def __getattr__(name: str):
    """The torch/Lightning names load on first use, so importing probes stays light."""
    if name in _STREAMING:
        from . import streaming

        return getattr(streaming, name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")


__all__ = ["DEFAULT_CS", "PIXEL_BASELINES", "KSparseProbe", "LinearProbe", "ProbeError", "Split", "StoreSource",
           "StreamingLinearProbe", "auroc_matrix", "baseline_verdict", "chance_accuracy", "colour_histogram",
           "default_ks", "evaluate", "evaluate_streaming", "label_purity_entropy", "labelled_rows", "macro_f1",
           "make_splits", "mean_colour", "mean_difference_scores", "monosemanticity", "pooled_features",
           "random_features", "sae_codes", "sae_key", "sparse_probing", "stratified_folds", "stratified_split",
           "streaming_moments", "sweep", "top_k_features", "top_rows"]
