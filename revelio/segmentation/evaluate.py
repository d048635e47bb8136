"""Zero-shot segmentation with saliency maps, ConceptAttention paper protocol, several methods side by side.

Per image: the model sees the image resized + centre-cropped to ``size``, noised to ``t``
(one denoiser call per noise seed, maps averaged) with the caption "a {class}". The
concepts are the image's classes followed by background words. Maps and ground truth are
compared at 224 x 224.

* ``concept_attention``: ConceptAttention (MM-DiT pipelines).
* ``cross_attention``: the DiT cross-attention baseline (q_img k_concept^T) from the same pass.
* ``daam``: DAAM on a UNet pipeline; the caption names every concept so each has a word map.
* ``center_prior``: no model; a centred Gaussian for the target, a flat map for the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..config import RevelioError
from ..saliency.real_image import concept_attention_on_images, daam_on_images
from .data import SegSample, fit_labels
from .metrics import EVAL_SIZE, IGNORE, BinaryScores, MultiClassScores, resize_labels, resize_map

METHODS = ["concept_attention", "cross_attention", "daam", "center_prior"]
BACKGROUND_WORDS = ["background", "floor", "tree", "person", "grass", "face"]


def concept_list(classes: Sequence[str], background: Sequence[str]) -> list[str]:
    """The image's classes, then the background words that are not one of them."""
    return list(classes) + [w for w in background if w not in classes]


def center_prior(n_concepts: int, size: int = EVAL_SIZE, sigma: float = 0.25) -> np.ndarray:
    """(C, size, size): a centred Gaussian (std ``sigma`` of the side) for concept 0, flat 0.5 for the others."""
    r = (np.arange(size) + 0.5) / size - 0.5
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    out = np.full((n_concepts, size, size), 0.5)
    out[0] = g
    return out


def method_maps(method: str, pipe, image, concepts: list[str], caption: str, t: int, seeds: Sequence[int],
                size: int, layers: Sequence[int] | None, options: dict | None = None) -> np.ndarray:
    """Soft maps (C, h, w) of one image for ``method``; ``options``: ``encoding``/``modulation`` for the
    concept methods, ``order`` for daam."""
    options = options or {}
    if method == "center_prior":
        return center_prior(len(concepts))
    if method in ("concept_attention", "cross_attention"):
        ca = concept_attention_on_images(pipe, [image], concepts, [caption], t=t, seeds=seeds, size=size,
                                         layers=layers, baseline=method == "cross_attention",
                                         encoding=options.get("encoding", "reference"),
                                         modulation=options.get("modulation", "reference"))
        maps = ca.maps() if method == "concept_attention" else ca.cross_attention_maps()
        return maps[0].float().numpy()
    if method == "daam":
        words_caption = "a " + ", ".join(concepts)
        tc = daam_on_images(pipe, [image], [words_caption], t=t, seeds=seeds, size=size,
                            order=options.get("order", "reference"))
        return tc.word_maps(concepts).float().numpy()
    raise RevelioError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def evaluate(samples: Iterable[SegSample], method: str, pipe, *, multiclass: bool = False, t: int = 500,
             seeds: Sequence[int] = (0,), size: int = 64, layers: Sequence[int] | None = None,
             background: Sequence[str] = BACKGROUND_WORDS, total: int | None = None,
             options: dict | None = None) -> dict[str, float]:
    """Scores of ``method`` over ``samples``: binary protocol on the first class, or multi-class argmax.

    ``options``: method options passed on (see :func:`method_maps`)."""
    if method not in METHODS:
        raise RevelioError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    scores = MultiClassScores() if multiclass else BinaryScores()
    for s in tqdm(samples, total=total, desc=f"segment {method}", leave=False):
        classes = s.classes if multiclass else s.classes[:1]
        concepts = concept_list(classes, background)
        caption = "a " + " and a ".join(classes)
        maps = method_maps(method, pipe, s.image, concepts, caption, t, seeds, size, layers, options)
        soft = resize_map(maps)
        gt = resize_labels(fit_labels(s.labels, size))
        if multiclass:
            arg = soft.argmax(0)
            pred = np.where(arg < len(classes), arg + 1, 0)
            scores.update(pred, gt, ["background"] + list(classes))
        else:
            scores.update(soft[0], gt == 1, valid=gt != IGNORE)
    return scores.result()


def format_table(results: dict[str, dict[str, float]], title: str) -> str:
    """A markdown table: one row per method, columns pixel accuracy, mIoU, mAP (percent).

    With a ``center_prior`` row, every method also gets its mIoU and mAP minus the prior's (the
    trivial baseline: objects sit near the middle), and a last line names the methods that beat it.
    """
    prior = results.get("center_prior")
    extra = " mIoU - prior | mAP - prior |" if prior else ""
    lines = [f"### {title}", "", "| method | pixel acc | mIoU | mAP | images |" + extra,
             "|---|---|---|---|---|" + ("---|---|" if prior else "")]

    def pct(v: float) -> str:
        return "-" if np.isnan(v) else f"{v:.1f}"

    def diff(v: float) -> str:
        return "-" if np.isnan(v) else f"{v:+.1f}"

    for m, r in results.items():
        ap = r.get("map", float("nan"))
        row = f"| {m} | {r['pixel_acc']:.1f} | {r['miou']:.1f} | {pct(ap)} | {r['images']} |"
        if prior:
            row += f" {diff(r['miou'] - prior['miou'])} | {diff(ap - prior.get('map', float('nan')))} |"
        lines.append(row)
    if prior:
        lines.append("")
        lines.append(prior_verdict(results))
    return "\n".join(lines)


def prior_verdict(results: dict[str, dict[str, float]]) -> str:
    """One line: which methods beat the centre prior in mIoU and in mAP (and by how much)."""
    prior = results["center_prior"]
    parts = []
    for key, name in (("miou", "mIoU"), ("map", "mAP")):
        p = prior.get(key, float("nan"))
        if np.isnan(p):
            continue
        better = [f"{m} ({r[key] - p:+.1f})" for m, r in results.items()
                  if m != "center_prior" and not np.isnan(r.get(key, float("nan"))) and r[key] > p]
        parts.append(f"{name} ({p:.1f}): " + (", ".join(better) if better else "none"))
    return "Beat the centre prior in " + "; in ".join(parts) + "."
