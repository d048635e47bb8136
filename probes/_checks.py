"""Input validation shared by every probe (arrays of the right shape, labels a probe can learn) and the shared
default C path. Light on purpose (numpy only): the CLI's ``--help`` reads ``DEFAULT_CS`` from here."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


class ProbeError(ValueError):
    """Input a probe cannot use; the message says what to pass instead."""


def check_X(X: object, name: str = "X") -> np.ndarray:
    """``X`` as a finite float32 (n_samples, n_features) array.

    Messages carry scikit-learn's wording where its estimator checks look for it.
    """
    if hasattr(X, "toarray") or hasattr(X, "tocsr"):  # scipy.sparse matrix or array
        raise ProbeError(f"{name} is a sparse matrix: sparse input is not supported; pass a dense array (X.toarray())")
    arr = np.asarray(X)
    if arr.ndim == 1:
        raise ProbeError(f"{name} must be a 2-D array (n_samples, n_features), got shape {arr.shape}. Reshape your "
                         "data with X.reshape(-1, 1) for a single feature or X.reshape(1, -1) for a single sample")
    if arr.ndim != 2:
        raise ProbeError(f"{name} must be a 2-D array (n_samples, n_features), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ProbeError(f"{name} is empty: found array with {arr.shape[0]} sample(s) and {arr.shape[1]} feature(s) "
                         f"(shape={arr.shape}) while a minimum of 1 is required.")
    if np.iscomplexobj(arr):
        raise ProbeError(f"{name}: Complex data not supported")
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)  # a TypeError (a dict in X, say) keeps numpy's own message
        except ValueError as e:
            raise ProbeError(f"{name} must be numeric, got dtype object holding non-numbers") from e
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise ProbeError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ProbeError(f"{name} holds NaN or inf values")
    return arr


def check_labels(y: object, min_per_class: int = 1, name: str = "y") -> np.ndarray:
    """``y`` as a vector of class labels with at least two classes, each with ``min_per_class`` samples.

    Integer labels come back as int64; -1 means "no label" in an activation store, so a vector of only
    -1 is a store without labels. String labels (class names) are kept as they are. A column vector
    (n, 1) is flattened with scikit-learn's DataConversionWarning.
    """
    if y is None:
        raise ProbeError(f"this probe requires y to be passed, but the target y is None")
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        import warnings

        from sklearn.exceptions import DataConversionWarning

        warnings.warn("A column-vector y was passed when a 1d array was expected. Please change the shape of y to "
                      "(n_samples,), for example using ravel().", DataConversionWarning, stacklevel=3)
        arr = arr.ravel()
    if arr.ndim != 1:
        raise ProbeError(f"{name} must be a 1-D vector of class labels, got shape {arr.shape}")
    if np.iscomplexobj(arr):
        raise ProbeError(f"{name}: Complex data not supported")
    if arr.dtype.kind in "USO" and all(isinstance(v, str) for v in arr.tolist()):
        classes, counts = np.unique(arr, return_counts=True)
        _check_counts(classes, counts, min_per_class, name)
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ProbeError(f"Unknown label type: {name} must hold class labels (integers or names), got dtype "
                             f"{arr.dtype}{' with continuous values' if np.issubdtype(arr.dtype, np.floating) else ''}")
    arr = arr.astype(np.int64, copy=False)
    if len(arr) and np.all(arr < 0):
        raise ProbeError(f"{name} holds no labels (every label is -1): probes need a labelled data set, "
                         "e.g. data.name digits or shapes, or folder/hf images sorted into class folders")
    if np.any(arr < 0):
        raise ProbeError(f"{name} holds unlabelled samples (-1); drop them first (probes.labelled_rows does)")
    classes, counts = np.unique(arr, return_counts=True)
    _check_counts(classes, counts, min_per_class, name)
    return arr


def _check_counts(classes: np.ndarray, counts: np.ndarray, min_per_class: int, name: str) -> None:
    if len(classes) < 2:
        raise ProbeError(f"{name} holds a single class ({classes.tolist()}: 1 class, {int(counts.sum())} sample(s)): a probe "
                         "needs at least two classes; use a data set with more than one label")
    if counts.min() < min_per_class:
        few = {c.item() if hasattr(c, "item") else c: int(n) for c, n in zip(classes, counts) if n < min_per_class}
        raise ProbeError(f"{name}: classes {few} have fewer than {min_per_class} samples; use more images "
                         "(data.count) or fewer folds/a larger test fraction")


def check_X_y(X: object, y: object, min_per_class: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Validate a design matrix and its labels together (same number of samples)."""
    Xa, ya = check_X(X), check_labels(y, min_per_class)
    if len(Xa) != len(ya):
        raise ProbeError(f"X has {len(Xa)} samples but y has {len(ya)} labels")
    return Xa, ya


_NOT_FITTED: list[type] = []


def check_fitted(est: object, attr: str = "classes_") -> None:
    """Raise a ProbeError that is also scikit-learn's NotFittedError when ``est`` has not been fitted."""
    if not hasattr(est, attr):
        if not _NOT_FITTED:  # built on first use: scikit-learn loads only when a probe is used
            from sklearn.exceptions import NotFittedError

            _NOT_FITTED.append(type("ProbeNotFittedError", (ProbeError, NotFittedError), {}))
        raise _NOT_FITTED[0](f"this {type(est).__name__} is not fitted yet; call fit(X, y) first")


def check_Cs(Cs: Sequence[float], cv: int | None) -> list[float]:
    """The inverse-regularisation path ``Cs`` sorted strong to weak (small to large C), checked against ``cv``."""
    try:
        out = sorted(float(c) for c in Cs)
    except (TypeError, ValueError) as e:
        raise ProbeError(f"Cs must be a list of positive numbers, got {Cs!r}") from e
    if not out or min(out) <= 0:
        raise ProbeError(f"Cs must be a non-empty list of positive inverse regularisation strengths, got {out}")
    if cv is not None and (isinstance(cv, bool) or not isinstance(cv, (int, np.integer)) or (cv and cv < 2)):
        raise ProbeError(f"cv must be None, 0 or a number of folds >= 2, got {cv!r}")
    if not cv and len(out) > 1:
        raise ProbeError(f"{len(out)} values of C need cross-validation to choose one: pass cv >= 2 or a single C")
    return out


def check_width(X: object, n_features_in: int, est: object) -> np.ndarray:
    """``X`` validated, with the width the estimator was fitted on (scikit-learn's wording)."""
    Xa = check_X(X)
    if Xa.shape[1] != n_features_in:
        raise ProbeError(f"X has {Xa.shape[1]} features, but {type(est).__name__} is expecting {n_features_in} "
                         "features as input")
    return Xa
