"""Linear probe: standardise, then L2 logistic regression with C chosen by cross-validation.

The regularisation path is walked from strong to weak (small to large C) with warm starts,
inside each fold the scaler is fitted on that fold's training part only, and the best C
(highest mean validation accuracy; ties go to the stronger regularisation) is refitted on
all the data ``fit`` was given. The caller's test images never reach ``fit``.

``LinearProbe`` and ``KSparseProbe`` are scikit-learn estimators: ``__init__`` only stores its
arguments, ``fit`` validates them, so ``sklearn.base.clone``, ``GridSearchCV`` and
``check_estimator`` work (tests/test_probes.py lists the checks that do not apply and why).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from ._checks import DEFAULT_CS, check_Cs, check_fitted, check_width, check_X_y
from .splits import stratified_folds

__all__ = ["DEFAULT_CS", "LinearProbe"]

SMALL_PROBLEM = 2_000_000  # X.size below which fits use a single thread


def _fit_logreg(X: np.ndarray, y: np.ndarray, C: float, max_iter: int, warm: object | None = None):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = warm if warm is not None else LogisticRegression(max_iter=max_iter, warm_start=True)
    clf.set_params(C=C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the path's weak end may stop at max_iter
        clf.fit(X, y)
    return clf


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression on standardised features (a scikit-learn classifier).

    Parameters: ``Cs`` the inverse-regularisation path, ``cv`` folds for choosing C (None or a
    single C: no CV), ``seed`` of the folds, ``max_iter`` of L-BFGS. Labels are integer class ids
    (-1 means "unlabelled" in a store and is refused).
    After ``fit``: ``classes_``, ``Cs_`` (the path, sorted), ``C_``, ``cv_scores_`` (n_Cs, n_folds)
    validation accuracies, ``n_features_in_``, ``scaler_``, ``clf_``.
    """

    def __init__(self, Cs: Sequence[float] = DEFAULT_CS, cv: int | None = 5, seed: int = 0, max_iter: int = 1000):
        self.Cs = Cs
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

        self.Cs_ = check_Cs(self.Cs, self.cv)
        X, y = check_X_y(X, y, min_per_class=2 if self.cv else 1)
        # Small problems run several times faster on one BLAS/OpenMP thread (benchmarks/probe_speed.py).
        with threadpool_limits(limits=1 if X.size < SMALL_PROBLEM else None):
            return self._fit(X, y)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> LinearProbe:
        from sklearn.preprocessing import StandardScaler

        self.classes_ = np.unique(y)
        self.n_features_in_ = X.shape[1]
        if self.cv and len(self.Cs_) > 1:
            folds = stratified_folds(y, self.cv, self.seed)
            scores = np.zeros((len(self.Cs_), len(folds)))
            for j, (tr, va) in enumerate(folds):
                scaler = StandardScaler().fit(X[tr])
                Xtr, Xva = scaler.transform(X[tr]), scaler.transform(X[va])
                clf = None
                for i, C in enumerate(self.Cs_):  # warm starts along the path, strong to weak
                    clf = _fit_logreg(Xtr, y[tr], C, self.max_iter, warm=clf)
                    scores[i, j] = float(np.mean(clf.predict(Xva) == y[va]))
            self.cv_scores_ = scores
            self.C_ = self.Cs_[int(np.argmax(scores.mean(axis=1)))]
        else:
            self.cv_scores_ = np.zeros((1, 0))
            self.C_ = self.Cs_[0]
        self.scaler_, self.clf_ = self._scaled_fit(X, y, self.C_)
        self.n_iter_ = int(np.max(self.clf_.n_iter_))  # L-BFGS iterations of the final fit
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

    def _check_width(self, X: np.ndarray) -> np.ndarray:
        return check_width(X, self.n_features_in_, self)
