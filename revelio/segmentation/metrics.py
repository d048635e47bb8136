"""Zero-shot segmentation metrics of the ConceptAttention paper's protocol.

Binary (one target class): the foreground is every pixel whose map value exceeds the
map's mean; pixel accuracy, mIoU over the two classes {background, foreground} from
intersections and unions ACCUMULATED over the data set, and mAP = the mean over images of
the average precision of the soft map against the mask. Multi-class: the prediction is
the argmax over concepts; pixel accuracy and mIoU over the classes, with an ignore label.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

EVAL_SIZE = 224
IGNORE = 255


def resize_map(m: np.ndarray | torch.Tensor, size: int = EVAL_SIZE) -> np.ndarray:
    """A (h, w) or (C, h, w) soft map bilinearly resized to ``size x size``."""
    t = torch.as_tensor(np.asarray(m, dtype=np.float32))
    squeeze = t.ndim == 2
    t = t[None, None] if squeeze else t[None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]
    return (out[0] if squeeze else out).numpy()


def resize_labels(labels: np.ndarray, size: int = EVAL_SIZE) -> np.ndarray:
    """An integer label map resized to ``size x size`` with nearest-neighbour sampling."""
    t = torch.as_tensor(np.asarray(labels).astype(np.int64))[None, None].float()
    return F.interpolate(t, size=(size, size), mode="nearest")[0, 0].long().numpy()


class BinaryScores:
    """Accumulates the binary protocol over images: ``update(soft_map, mask)`` then ``result()``."""

    def __init__(self):
        self.correct = 0
        self.labeled = 0
        self.inter = np.zeros(2, dtype=np.int64)
        self.union = np.zeros(2, dtype=np.int64)
        self.aps: list[float] = []

    def update(self, soft: np.ndarray, mask: np.ndarray, valid: np.ndarray | None = None) -> None:
        """``soft`` and ``mask`` at the same resolution; ``valid`` marks pixels that count (default: all)."""
        soft = np.asarray(soft, dtype=np.float64)
        mask = np.asarray(mask, dtype=bool)
        if soft.shape != mask.shape:
            raise ValueError(f"map {soft.shape} and mask {mask.shape} differ in shape")
        valid = np.ones_like(mask) if valid is None else np.asarray(valid, dtype=bool)
        pred = soft > soft[valid].mean()
        p, g = pred[valid], mask[valid]
        self.correct += int((p == g).sum())
        self.labeled += int(valid.sum())
        for k, (pk, gk) in enumerate(((~p, ~g), (p, g))):  # 0 = background, 1 = foreground
            self.inter[k] += int((pk & gk).sum())
            self.union[k] += int((pk | gk).sum())
        if g.any():  # AP is undefined for an image without foreground
            self.aps.append(float(average_precision_score(g.ravel(), soft[valid].ravel())))

    def result(self) -> dict[str, float]:
        """Pixel accuracy, mIoU (accumulated) and mAP (mean per-image AP), in percent."""
        iou = self.inter / np.maximum(self.union, 1)
        return {"pixel_acc": 100 * self.correct / max(self.labeled, 1), "miou": 100 * float(iou.mean()),
                "map": 100 * float(np.mean(self.aps)) if self.aps else float("nan"), "images": len(self.aps)}


class MultiClassScores:
    """Accumulates the multi-class protocol by class NAME, so images with different class sets share one table.

    ``update(pred, gt, names)``: integer maps whose id ``k`` means ``names[k]`` (``IGNORE`` in ``gt``
    is skipped). mIoU is the mean over every class seen of accumulated intersection / union.
    """

    def __init__(self):
        self.correct = 0
        self.labeled = 0
        self.inter: dict[str, int] = {}
        self.union: dict[str, int] = {}
        self.images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray, names: list[str]) -> None:
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and truth {gt.shape} differ in shape")
        valid = gt != IGNORE
        p, g = pred[valid], gt[valid]
        self.correct += int((p == g).sum())
        self.labeled += int(valid.sum())
        for k, name in enumerate(names):
            pk, gk = p == k, g == k
            if pk.any() or gk.any():
                self.inter[name] = self.inter.get(name, 0) + int((pk & gk).sum())
                self.union[name] = self.union.get(name, 0) + int((pk | gk).sum())
        self.images += 1

    def result(self) -> dict[str, float]:
        """Pixel accuracy and mIoU over the classes seen, in percent."""
        ious = [self.inter[n] / self.union[n] for n in self.union]
        return {"pixel_acc": 100 * self.correct / max(self.labeled, 1),
                "miou": 100 * float(np.mean(ious)) if ious else float("nan"), "images": self.images}
