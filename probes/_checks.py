"""Input validation shared by every probe: arrays of the right shape, labels a probe can learn."""

from __future__ import annotations

import numpy as np


class ProbeError(ValueError):
    """Input a probe cannot use; the message says what to pass instead."""


def check_X(X: object, name: str = "X") -> np.ndarray:
    """``X`` as a finite float32 (n_samples, n_features) array."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ProbeError(f"{name} must be a 2-D array (n_samples, n_features), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ProbeError(f"{name} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number):
        raise ProbeError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ProbeError(f"{name} holds NaN or inf values")
    return arr


def check_labels(y: object, min_per_class: int = 1, name: str = "y") -> np.ndarray:
    """``y`` as an int64 vector with at least two classes, each with ``min_per_class`` samples.

    -1 means "no label" in an activation store; a vector of only -1 is a store without labels.
    """
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ProbeError(f"{name} must be a 1-D vector of class labels, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ProbeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if len(arr) and np.all(arr < 0):
        raise ProbeError(f"{name} holds no labels (every label is -1): probes need a labelled data set, "
                         "e.g. data.name digits or shapes, or folder/hf images sorted into class folders")
    if np.any(arr < 0):
        raise ProbeError(f"{name} holds unlabelled samples (-1); drop them first (probes.labelled_rows does)")
    classes, counts = np.unique(arr, return_counts=True)
    if len(classes) < 2:
        raise ProbeError(f"{name} holds a single class ({classes.tolist()}): a probe needs at least two classes; "
                         "use a data set with more than one label")
    if counts.min() < min_per_class:
        few = {int(c): int(n) for c, n in zip(classes, counts) if n < min_per_class}
        raise ProbeError(f"{name}: classes {few} have fewer than {min_per_class} samples; use more images "
                         "(data.count) or fewer folds/a larger test fraction")
    return arr


def check_X_y(X: object, y: object, min_per_class: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Validate a design matrix and its labels together (same number of samples)."""
    Xa, ya = check_X(X), check_labels(y, min_per_class)
    if len(Xa) != len(ya):
        raise ProbeError(f"X has {len(Xa)} samples but y has {len(ya)} labels")
    return Xa, ya


def check_fitted(est: object, attr: str = "classes_") -> None:
    if not hasattr(est, attr):
        raise ProbeError(f"this {type(est).__name__} is not fitted yet; call fit(X, y) first")
