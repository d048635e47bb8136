"""Alignment scores against hand computations and independent implementations (sklearn, numpy)."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from revelio.analysis import metrics as M


def test_iou_hand_computed():
    m = np.array([[0.0, 1.0], [2.0, 4.0]])  # min-max: 0, .25, .5, 1 -> > 0.4: [[F, F], [T, T]]
    mask = np.array([[False, True], [True, False]])
    # pred {(1,0), (1,1)}, mask {(0,1), (1,0)}: intersection 1, union 3
    assert M.iou(m, mask, tau=0.4) == pytest.approx(1 / 3)
    assert M.iou(m, mask, tau=0.1) == pytest.approx(2 / 3)  # pred also (0,1): inter 2, union 3


def test_iou_empty_union_is_nan_and_constant_map_predicts_nothing():
    assert np.isnan(M.iou(np.ones((2, 2)), np.zeros((2, 2), bool)))
    assert M.iou(np.ones((2, 2)), np.eye(2, dtype=bool)) == 0.0


def test_pearson_matches_numpy_and_handles_constants():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(5, 4, 3))
    ref = rng.normal(size=(4, 3))
    want = [np.corrcoef(x.ravel(), ref.ravel())[0, 1] for x in maps]
    np.testing.assert_allclose(M.pearson(maps, ref), want, rtol=1e-10)
    assert M.pearson(np.zeros((4, 3)), ref) == 0.0


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    maps = rng.integers(0, 4, size=(6, 5, 5)).astype(float)  # many ties
    mask = rng.random((5, 5)) > 0.6
    want = [roc_auc_score(mask.ravel(), x.ravel()) for x in maps]
    np.testing.assert_allclose(M.auroc(maps, mask), want, rtol=1e-12)
    assert M.auroc(np.zeros((5, 5)), mask) == pytest.approx(0.5)
    assert np.isnan(M.auroc(maps[0], np.zeros((5, 5), bool)))


def test_auroc_hand_computed():
    # scores 0.1 0.4 0.35 0.8, positives at 0.35 and 0.8: pairs (pos > neg): 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    assert M.auroc(np.array([[0.1, 0.4], [0.35, 0.8]]), np.array([[0, 0], [1, 1]], bool)) == pytest.approx(0.75)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="resize"):
        M.iou(np.zeros((3, 4, 4)), np.zeros((8, 8), bool))


def test_resize_mask_and_maps():
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    mask[4, 4] = True  # a lone pixel vanishes when shrinking by area
    small = M.resize_mask(mask, (2, 2))
    np.testing.assert_array_equal(small, [[True, False], [False, False]])
    np.testing.assert_array_equal(M.resize_mask(small, (4, 4))[:2, :2], True)
    up = M.resize_maps(np.arange(4.0).reshape(1, 2, 2), (4, 4))
    assert up.shape == (1, 4, 4) and up[0, 0, 0] == 0.0 and up[0, -1, -1] == 3.0
