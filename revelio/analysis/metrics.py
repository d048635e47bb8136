"""How well a map matches a reference: IoU at a threshold, Pearson correlation, AUROC against a mask.

Maps are spatial arrays ``(..., h, w)`` and every score is computed for all leading maps at
once against one ``(h, w)`` reference (e.g. every active SAE latent of one image), because
ranking thousands of latents per concept is the common case; a single ``(h, w)`` map gives a
0-d result.

Conventions (documented so tables can be read): maps are min-max normalised per map before
thresholding (the DAAM convention, tau = 0.4); a constant map has no above-threshold pixels
and zero correlation; an IoU with an empty union and an AUROC with a one-class mask are
undefined and come back as NaN, which the aggregations skip.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_TAU = 0.4


def _flat(maps: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(L, P) rows of ``maps``, the (P,) reference and the leading shape to restore."""
    a = np.asarray(maps, dtype=np.float64)
    r = np.asarray(reference)
    if r.ndim != 2 or a.ndim < 2 or a.shape[-2:] != r.shape:
        raise ValueError(f"maps of shape {a.shape} do not fit a reference of shape {r.shape}: expected maps "
                         f"(..., h, w) and a reference (h, w) on the same grid (resize_maps / resize_mask first)")
    lead = a.shape[:-2]
    return a.reshape(-1, r.size), r.reshape(-1), lead


def minmax(maps: np.ndarray) -> np.ndarray:
    """Each (h, w) map of ``maps`` (..., h, w) scaled to [0, 1]; constant maps become all zeros."""
    a = np.asarray(maps, dtype=np.float64)
    lo, hi = a.min(axis=(-2, -1), keepdims=True), a.max(axis=(-2, -1), keepdims=True)
    span = hi - lo
    return np.where(span > 0, (a - lo) / np.where(span > 0, span, 1.0), 0.0)


def binarise(maps: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """Boolean maps: pixels whose min-max normalised value exceeds ``tau``."""
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"threshold tau must be in [0, 1), got {tau}")
    return minmax(maps) > tau


def iou(maps: np.ndarray, mask: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """IoU of each map binarised at ``tau`` with the boolean ``mask``: (L,) floats, NaN for an empty union."""
    pred, m, lead = _flat(binarise(maps, tau), np.asarray(mask, dtype=bool))
    pred = pred.astype(bool)
    inter = (pred & m).sum(axis=1)
    union = (pred | m).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan).reshape(lead)


def pearson(maps: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Pearson correlation of each map with ``reference`` (a soft map or a mask): (L,), 0 if either is constant."""
    a, r, lead = _flat(maps, reference)
    a = a - a.mean(axis=1, keepdims=True)
    r = r.astype(np.float64) - r.mean()
    den = np.sqrt((a * a).sum(axis=1)) * np.sqrt((r * r).sum())
    return np.where(den > 0, (a @ r) / np.where(den > 0, den, 1.0), 0.0).reshape(lead)


def auroc(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Area under the ROC curve of each map's values as a score for ``mask`` pixels: (L,), NaN for a one-class mask.

    Pixels are the samples and the mask the two classes of the probes stage's Mann-Whitney
    ``auroc_matrix`` (average ranks for ties, so a constant map scores exactly 0.5).
    """
    from probes import auroc_matrix

    a, m, lead = _flat(maps, np.asarray(mask, dtype=bool))
    if m.all() or not m.any():
        return np.full(lead, np.nan)
    return auroc_matrix(a.T, m.astype(np.int64))[1].astype(np.float64).reshape(lead)


def scores(maps: np.ndarray, reference: np.ndarray, mask: np.ndarray,
           tau: float = DEFAULT_TAU) -> dict[str, np.ndarray]:
    """The three scores of each map: IoU and AUROC against the boolean ``mask``, Pearson against ``reference``.

    For a ground-truth mask, ``reference`` is the mask itself; for a saliency map it is the soft
    map and ``mask`` its binarisation (``binarise(reference, tau)``).
    """
    return {"iou": iou(maps, mask, tau), "pearson": pearson(maps, reference), "auroc": auroc(maps, mask)}


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (..., h, w) float maps to ``size`` = (H, W) (no-op when equal)."""
    a = np.asarray(maps, dtype=np.float32)
    if tuple(a.shape[-2:]) == tuple(size):
        return a
    lead = a.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(a.reshape(-1, 1, *a.shape[-2:])))
    out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size).numpy()


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean mask at ``size``: area-average then > 0.5 when shrinking, nearest when growing."""
    m = np.asarray(mask, dtype=bool)
    if m.shape == tuple(size):
        return m
    t = torch.from_numpy(m.astype(np.float32))[None, None]
    if size[0] <= m.shape[0] and size[1] <= m.shape[1]:
        return (F.adaptive_avg_pool2d(t, size)[0, 0] > 0.5).numpy()
    return (F.interpolate(t, size=tuple(size), mode="nearest")[0, 0] > 0.5).numpy()

