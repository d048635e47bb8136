"""Linear probe: standardise, then L2 logistic regression with C chosen by cross-validation.

The regularisation path is walked from strong to weak (small to large C) with warm starts,
inside each fold the scaler is fitted on that fold's training part only, and the best C
(highest mean validation accuracy; ties go to the stronger regularisation) is refitted on
all the data ``fit`` was given. The caller's test images never reach ``fit``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ._checks import ProbeError, check_fitted, check_X, check_X_y
from .splits import stratified_folds

SMALL_PROBLEM = 2_000_000  # X.size below which fits use a single thread
DEFAULT_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _fit_logreg(X: np.ndarray, y: np.ndarray, C: float, max_iter: int, warm: object | None = None):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = warm if warm is not None else LogisticRegression(max_iter=max_iter, warm_start=True)
    clf.set_params(C=C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the path's weak end may stop at max_iter
        clf.fit(X, y)
    return clf


class LinearProbe:
    """Multinomial logistic regression on standardised features (scikit-learn style).

    Parameters: ``Cs`` the inverse-regularisation path, ``cv`` folds for choosing C (None or a
    single C: no CV), ``seed`` of the folds, ``max_iter`` of L-BFGS.
    After ``fit``: ``classes_``, ``C_``, ``cv_scores_`` (n_Cs, n_folds) validation accuracies,
    ``scaler_``, ``clf_``.
    """

    def __init__(self, Cs: Sequence[float] = DEFAULT_CS, cv: int | None = 5, seed: int = 0, max_iter: int = 1000):
        Cs = [float(c) for c in Cs]
        if not Cs or min(Cs) <= 0:
            raise ProbeError(f"Cs must be a non-empty list of positive inverse regularisation strengths, got {Cs}")
        if not cv and len(Cs) > 1:
            raise ProbeError(f"{len(Cs)} values of C need cross-validation to choose one: pass cv >= 2 or a single C")
        self.Cs = sorted(Cs)
        self.cv = cv
        self.seed = seed
        self.max_iter = max_iter

    def _scaled_fit(self, X: np.ndarray, y: np.ndarray, C: float):
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        return scaler, _fit_logreg(scaler.transform(X), y, C, self.max_iter)

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearProbe:
        """Choose C on folds of (X, y), then refit on all of it."""
        from threadpoolctl import threadpool_limits

        X, y = check_X_y(X, y, min_per_class=2 if self.cv else 1)
        # Small problems run several times faster on one BLAS/OpenMP thread (benchmarks/probes.py).
        with threadpool_limits(limits=1 if X.size < SMALL_PROBLEM else None):
            return self._fit(X, y)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> LinearProbe:
        from sklearn.preprocessing import StandardScaler

        self.classes_ = np.unique(y)
        if self.cv and len(self.Cs) > 1:
            folds = stratified_folds(y, self.cv, self.seed)
            scores = np.zeros((len(self.Cs), len(folds)))
            for j, (tr, va) in enumerate(folds):
                scaler = StandardScaler().fit(X[tr])
                Xtr, Xva = scaler.transform(X[tr]), scaler.transform(X[va])
                clf = None
                for i, C in enumerate(self.Cs):
                    clf = _fit_logreg(Xtr, y[tr], C, self.max_iter, warm=clf)
                    scores[i, j] = float(np.mean(clf.predict(Xva) == y[va]))
            self.cv_scores_ = scores
            self.C_ = self.Cs[int(np.argmax(scores.mean(axis=1)))]
        else:
            self.cv_scores_ = np.zeros((1, 0))
            self.C_ = self.Cs[0]
        self.scaler_, self.clf_ = self._scaled_fit(X, y, self.C_)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_fitted(self)
        return self.clf_.decision_function(self.scaler_.transform(self._check_width(X)))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_fitted(self)
        return self.clf_.predict_proba(self.scaler_.transform(self._check_width(X)))

    def predict(self, X: np.ndarray) -> np.ndarray:
        check_fitted(self)
        return self.clf_.predict(self.scaler_.transform(self._check_width(X)))

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Accuracy on (X, y)."""
        return float(np.mean(self.predict(X) == np.asarray(y)))

    def _check_width(self, X: np.ndarray) -> np.ndarray:
        X = check_X(X)
        if X.shape[1] != self.scaler_.n_features_in_:
            raise ProbeError(f"X has {X.shape[1]} features but the probe was fitted on {self.scaler_.n_features_in_}")
        return X
