"""Image-level splits fixed by a seed: the test images never take part in model selection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import ProbeError, check_labels


@dataclass(frozen=True)
class Split:
    """Indices (into the labelled images) of one train/test split and the seed that made it."""

    seed: int
    train: np.ndarray
    test: np.ndarray


def stratified_split(y: np.ndarray, test_fraction: float, seed: int, min_train: int = 2) -> Split:
    """Split images so each class keeps about ``test_fraction`` of its images in the test set.

    Every class gets at least one test and ``min_train`` train images (2 by default, so
    cross-validation on the train part still sees every class twice); the result depends only
    on ``y``, ``seed`` and ``min_train``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ProbeError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    y = check_labels(y, min_per_class=min_train + 1)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = min(max(1, round(test_fraction * len(idx))), len(idx) - min_train)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return Split(seed=seed, train=np.sort(np.concatenate(train)), test=np.sort(np.concatenate(test)))


def make_splits(y: np.ndarray, test_fraction: float, seeds: list[int]) -> list[Split]:
    """One stratified split per seed (the spread over seeds is the reported uncertainty)."""
    if not seeds:
        raise ProbeError("seeds must name at least one split seed, e.g. [0, 1, 2]")
    return [stratified_split(y, test_fraction, s) for s in seeds]


def stratified_folds(y: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) index pairs of seeded stratified k-fold CV over ``y``.

    ``n_folds`` is lowered to the smallest class count (at least 2), so tiny data sets still
    cross-validate; a class with a single sample is an error.
    """
    y = check_labels(y, min_per_class=2)
    if n_folds < 2:
        raise ProbeError(f"cross-validation needs n_folds >= 2, got {n_folds}")
    from sklearn.model_selection import StratifiedKFold

    k = min(n_folds, int(np.unique(y, return_counts=True)[1].min()))
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(y)), y))
