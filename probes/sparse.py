"""k-sparse probes (SAEBench "sparse probing"): pick the k latents whose class means differ most, fit on them.

Selection uses the training data only. For two classes a latent's score is |mean_1 - mean_0|;
for more, it is the largest one-vs-rest gap max_c |mean_c - mean_rest|, so a latent that
singles out any one class ranks high. Accuracy vs k = 1, 2, 4, ... shows how few latents
carry the label: a monosemantic dictionary needs few.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from ._checks import DEFAULT_CS, ProbeError, check_Cs, check_fitted, check_width, check_X_y
from .linear import LinearProbe


def mean_difference_scores(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n_features,) selection score: the largest gap between a class mean and the mean of the rest."""
    X, y = check_X_y(X, y)
    Xd = X.astype(np.float64)
    classes = np.unique(y)
    total, n = Xd.sum(axis=0), len(y)
    gaps = []
    for c in classes[:1] if len(classes) == 2 else classes:  # binary: both one-vs-rest gaps are equal
        m = y == c
        s_c = Xd[m].sum(axis=0)
        gaps.append(np.abs(s_c / m.sum() - (total - s_c) / (n - m.sum())))
    return np.max(gaps, axis=0)


def top_k_features(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first (ties: lower index first)."""
    if not 1 <= k <= len(scores):
        raise ProbeError(f"k must lie in [1, {len(scores)}] (n_features = {len(scores)}), got {k}")
    return np.argsort(-scores, kind="stable")[:k]


class KSparseProbe(ClassifierMixin, BaseEstimator):
    """Select ``k`` features by class-mean difference, then a ``LinearProbe`` on those alone (a scikit-learn
    classifier; parameters as ``LinearProbe`` plus ``k``, checked by ``fit``).

    After ``fit``: ``features_`` (the k selected indices, best first), ``scores_``, ``probe_``.
    """

    def __init__(self, k: int = 1, Cs: Sequence[float] = DEFAULT_CS, cv: int | None = 5, seed: int = 0,
                 max_iter: int = 1000):
        self.k = k
        self.Cs, self.cv, self.seed, self.max_iter = Cs, cv, seed, max_iter

    def fit(self, X: np.ndarray, y: np.ndarray) -> KSparseProbe:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ProbeError(f"k must be a positive number of features, got {self.k!r}")
        check_Cs(self.Cs, self.cv)
        X, y = check_X_y(X, y)
        self.scores_ = mean_difference_scores(X, y)
        self.features_ = top_k_features(self.scores_, int(self.k))
        self.probe_ = LinearProbe(self.Cs, self.cv, self.seed, self.max_iter).fit(X[:, self.features_], y)
        self.classes_ = self.probe_.classes_
        self.n_features_in_ = X.shape[1]
        self.n_iter_ = self.probe_.n_iter_
        return self

    def _select(self, X: np.ndarray) -> np.ndarray:
        check_fitted(self)
        return check_width(X, self.n_features_in_, self)[:, self.features_]

    def predict(self, X: np.ndarray) -> np.ndarray:
        Xk = self._select(X)  # checks fitted before probe_ is touched
        return self.probe_.predict(Xk)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        Xk = self._select(X)
        return self.probe_.predict_proba(Xk)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        Xk = self._select(X)
        return self.probe_.decision_function(Xk)


def default_ks(n_features: int, k_max: int | None = None) -> list[int]:
    """1, 2, 4, ... up to min(k_max, n_features)."""
    top = min(n_features, k_max or n_features)
    ks, k = [], 1
    while k <= top:
        ks.append(k)
        k *= 2
    return ks
