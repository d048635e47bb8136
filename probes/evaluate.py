"""Probe accuracy of one feature matrix under fixed image splits: mean and spread over split seeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._checks import check_X_y
from ._checks import DEFAULT_CS
from .splits import Split


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred``."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def chance_accuracy(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """Accuracy of always predicting the training split's most frequent class."""
    vals, counts = np.unique(y_train, return_counts=True)
    return float(np.mean(y_test == vals[np.argmax(counts)]))


def summarise(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    """Mean and std over seeds of accuracy, macro-F1, CV accuracy and chance; per-seed lists of the first two and C."""
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        vals = np.array([r[key] for r in per_seed], dtype=np.float64)
        if key in ("accuracy", "macro_f1", "cv_accuracy", "chance"):
            out[f"{key}_mean"] = float(vals.mean())
            out[f"{key}_std"] = float(vals.std())
        if key in ("accuracy", "macro_f1", "C"):
            out[f"{key}_per_seed"] = vals.tolist()
    return out


def evaluate(X: np.ndarray, y: np.ndarray, splits: Sequence[Split], k: int | None = None,
             Cs: Sequence[float] = DEFAULT_CS, cv: int | None = 5, max_iter: int = 1000) -> dict[str, Any]:
    """Fit a probe (linear, or k-sparse when ``k`` is given) on each split's train images, score its test images.

    Returns accuracy / macro-F1 / chance mean and std over the splits, the CV accuracy of the chosen
    C (mean over seeds, and its std over folds, averaged over seeds: ``cv_fold_std``) and sizes.
    """
    from .linear import LinearProbe  # scikit-learn loads with the first fit, not with `import probes`
    from .sparse import KSparseProbe

    X, y = check_X_y(X, y)
    per_seed, fold_std = [], []
    for s in splits:
        probe = (LinearProbe(Cs, cv, s.seed, max_iter) if k is None
                 else KSparseProbe(k, Cs, cv, s.seed, max_iter)).fit(X[s.train], y[s.train])
        lin = probe if k is None else probe.probe_
        best = lin.cv_scores_[lin.Cs_.index(lin.C_)]
        pred = probe.predict(X[s.test])
        per_seed.append({"accuracy": float(np.mean(pred == y[s.test])), "macro_f1": macro_f1(y[s.test], pred),
                         "cv_accuracy": float(best.mean()) if best.size else float("nan"),
                         "chance": chance_accuracy(y[s.train], y[s.test]), "C": lin.C_})
        fold_std.append(float(best.std()) if best.size else float("nan"))
    rec = {"probe": "linear" if k is None else "k-sparse", "k": k, "d": int(X.shape[1]), "n_images": int(len(y)),
           "n_train": int(len(splits[0].train)), "n_test": int(len(splits[0].test)),
           "n_classes": int(len(np.unique(y))), "n_seeds": len(splits)}
    rec.update(summarise(per_seed))
    rec["cv_fold_std"] = float(np.mean(fold_std))
    return rec


def sparse_probing(X: np.ndarray, y: np.ndarray, splits: Sequence[Split], ks: Sequence[int] | None = None,
                   k_max: int | None = 64, **kw: Any) -> list[dict[str, Any]]:
    """SAEBench sparse probing: ``evaluate`` with k = 1, 2, 4, ... selected latents (one record per k)."""
    from .sparse import default_ks

    ks = list(ks) if ks else default_ks(np.asarray(X).shape[1], k_max)
    return [evaluate(X, y, splits, k=k, **kw) for k in ks if k <= np.asarray(X).shape[1]]
