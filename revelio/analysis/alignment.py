"""Do SAE features agree with saliency maps and with ground truth? Rank latents per concept.

For every image and every concept in it, each latent's map (``feature_maps``) is scored
against two references: the concept's saliency map (DAAM or ConceptAttention) and, where the
data set knows it, the concept's ground-truth mask. Scores (``metrics``): IoU at a threshold,
Pearson correlation and AUROC. A latent's score for a concept is its mean over the images
holding the concept (a latent silent on an image scores 0 IoU / 0 correlation / 0.5 AUROC
there, so rare latents are not favoured). The saliency map itself is scored against the mask
too, which answers: does the concept's best latent segment it better than the saliency map?
That comparison picks the best latent on half of the images and counts wins on the other
half, so the selection among thousands of latents does not flatter the latent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets import Sample
from . import metrics as M

METRICS = ("iou", "pearson", "auroc")
REFERENCES = ("saliency", "mask")
SALIENCY_METHODS = ("auto", "daam", "concept_attention", "cross_attention", "none")


def image_concepts(sample: Sample, vocabulary: Sequence[str] | None = None) -> list[str]:
    """Concepts to score on ``sample``: those of ``vocabulary`` (default: the sample's own) that it holds.

    With ground-truth masks a concept counts only where its mask is non-empty; without masks
    every concept asked for is kept (its saliency map is the only reference).
    """
    wanted = list(vocabulary) if vocabulary else list(sample.concepts)
    if sample.masks is None:
        return wanted
    return [c for c in wanted if c in sample.masks and bool(np.asarray(sample.masks[c]).any())]


class SaliencyMaps:
    """Saliency maps of real images: noise to ``t``, ONE denoiser call with the caption, traced
    (``revelio.saliency.real_image``).

    ``method``: ``daam`` (UNets and PixArt; also DiT cross-attention for MM-DiTs), ``concept_attention`` or
    ``cross_attention`` (the ConceptAttention paper's baseline; both MM-DiT only) or ``auto``
    (ConceptAttention for MM-DiTs, whose adapter answers joint attention; DAAM otherwise). DAAM maps exist only for words of the
    caption; ConceptAttention scores a fixed ``vocabulary`` of free words (softmax across it).
    """

    def __init__(self, pipe: Any, method: str, t: int, seed: int = 0, size: int = 64,
                 vocabulary: Sequence[str] | None = None):
        from extraction.adapters import get_adapter

        if method not in SALIENCY_METHODS or method == "none":
            valid = ", ".join(m for m in SALIENCY_METHODS if m != "none")
            raise ValueError(f"saliency method {method!r} is not one of {valid}")
        if method == "auto":
            method = "concept_attention" if get_adapter(pipe).cross_attention == "joint" else "daam"
        if method in ("concept_attention", "cross_attention") and not vocabulary:
            raise ValueError(f"saliency method {method!r} needs a concept vocabulary (e.g. ['circle', 'square', "
                             "'background'])")
        self.pipe, self.method, self.t, self.seed, self.size = pipe, method, int(t), seed, size
        self.vocabulary = list(vocabulary or [])

    @torch.no_grad()
    def __call__(self, samples: Sequence[Sample], concepts: Sequence[Sequence[str]]) -> list[dict[str, np.ndarray]]:
        """Per sample, {concept: (h, w) map} for the ``concepts`` of that sample that the method can map."""
        from ..saliency import WordNotInPrompt
        from ..saliency.real_image import concept_attention_on_images, daam_on_images

        images, captions = [s.image for s in samples], [s.caption for s in samples]
        out: list[dict[str, np.ndarray]] = [{} for _ in samples]
        if self.method == "daam":
            tc = daam_on_images(self.pipe, images, captions, t=self.t, seeds=(self.seed,), size=self.size)
            for i, cs in enumerate(concepts):
                for c in cs:
                    try:
                        out[i][c] = tc.word_map(c, index=i).float().numpy()
                    except WordNotInPrompt:
                        continue  # DAAM has no map for a word the caption does not contain
            return out
        ca = concept_attention_on_images(self.pipe, images, self.vocabulary, captions, t=self.t, seeds=(self.seed,),
                                         size=self.size, baseline=self.method == "cross_attention")
        maps = (ca.maps() if self.method == "concept_attention" else ca.cross_attention_maps()).float().numpy()
        for i, cs in enumerate(concepts):
            for c in cs:
                if c in self.vocabulary:
                    out[i][c] = maps[i, self.vocabulary.index(c)]
        return out


@dataclass
class _ConceptRecord:
    """Running sums of one concept's scores (per reference: (3 metrics, d_sae)) and per-image mask scores."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    n_images: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REFERENCES})
    saliency_vs_mask: list[np.ndarray] = field(default_factory=list)  # (3,) per image holding both
    paired: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (latents (3, d_sae), saliency (3,))


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` skipping NaNs; NaN (without a warning) where every value is NaN."""
    ok = ~np.isnan(a)
    n = ok.sum(axis=axis)
    return np.where(n > 0, np.where(ok, a, 0.0).sum(axis=axis) / np.maximum(n, 1), np.nan)


class AlignmentTable:
    """Accumulates per-concept latent scores image by image; ranks latents and compares with saliency."""

    def __init__(self, d_sae: int, eval_size: int = 64, tau: float = M.DEFAULT_TAU):
        if eval_size < 2:
            raise ValueError(f"eval_size must be >= 2, got {eval_size}")
        M.binarise(np.zeros((1, 1)), tau)  # validates tau
        self.d_sae, self.size, self.tau = d_sae, (eval_size, eval_size), tau
        self.concepts: dict[str, _ConceptRecord] = {}

    def _record(self, concept: str) -> _ConceptRecord:
        if concept not in self.concepts:
            z = {r: np.zeros((len(METRICS), self.d_sae)) for r in REFERENCES}
            self.concepts[concept] = _ConceptRecord(sums=z, counts={r: np.zeros_like(v) for r, v in z.items()})
        return self.concepts[concept]

    def _latent_scores(self, maps: np.ndarray, active: np.ndarray, soft: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(3, d_sae) scores; silent latents get the scores of an all-zero map, computed once."""
        silent = M.scores(np.zeros(self.size), soft, mask, self.tau)
        out = np.repeat(np.array([silent[m] for m in METRICS], dtype=np.float64)[:, None], self.d_sae, axis=1)
        if len(active):
            got = M.scores(maps[active], soft, mask, self.tau)
            for j, m in enumerate(METRICS):
                out[j, active] = got[m]
        return out

    def add(self, maps: np.ndarray, saliency: dict[str, np.ndarray], masks: dict[str, np.ndarray] | None,
            concepts: Sequence[str]) -> None:
        """Score one image: latent ``maps`` (d_sae, h, w) against each concept's saliency map and/or mask."""
        if maps.shape[0] != self.d_sae:
            raise ValueError(f"expected {self.d_sae} latent maps, got {maps.shape[0]}")
        active = np.flatnonzero(maps.reshape(self.d_sae, -1).max(axis=1) > 0)
        ev = np.zeros((self.d_sae, *self.size), dtype=np.float32)
        if len(active):
            ev[active] = M.resize_maps(maps[active], self.size)
        for c in concepts:
            rec = self._record(c)
            sal = saliency.get(c)
            mask = None if masks is None or c not in masks else M.resize_mask(masks[c], self.size)
            per: dict[str, np.ndarray] = {}
            if sal is not None:
                soft = M.resize_maps(sal, self.size)
                per["saliency"] = self._latent_scores(ev, active, soft, M.binarise(soft, self.tau))
            if mask is not None:
                per["mask"] = self._latent_scores(ev, active, mask.astype(np.float32), mask)
            for ref, s in per.items():
                ok = ~np.isnan(s)
                rec.sums[ref] += np.where(ok, s, 0.0)
                rec.counts[ref] += ok
                rec.n_images[ref] += 1
            if sal is not None and mask is not None:
                base = M.scores(soft, mask.astype(np.float32), mask, self.tau)
                base_arr = np.array([float(base[m]) for m in METRICS])
                rec.saliency_vs_mask.append(base_arr)
                rec.paired.append((per["mask"].astype(np.float32), base_arr))

    def means(self, concept: str, reference: str) -> np.ndarray:
        """(3, d_sae) mean scores of every latent for ``concept`` against ``reference`` (NaN where undefined)."""
        rec = self._get(concept)
        if reference not in REFERENCES:
            raise ValueError(f"reference {reference!r} is not one of {', '.join(REFERENCES)}")
        return np.where(rec.counts[reference] > 0, rec.sums[reference] / np.maximum(rec.counts[reference], 1), np.nan)

    def _get(self, concept: str) -> _ConceptRecord:
        if concept not in self.concepts:
            raise KeyError(f"concept {concept!r} was not scored; scored concepts: {', '.join(sorted(self.concepts))}")
        return self.concepts[concept]

    def ranking(self, concept: str, reference: str, metric: str = "iou", top: int = 5) -> list[int]:
        """The ``top`` latents for ``concept`` by mean ``metric`` against ``reference`` (best first)."""
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
        s = self.means(concept, reference)[METRICS.index(metric)]
        if np.all(np.isnan(s)):
            return []
        order = np.argsort(-np.nan_to_num(s, nan=-np.inf), kind="stable")
        return [int(i) for i in order[:top]]

    def best_concepts(self, latent: int, reference: str = "mask", metric: str = "iou",
                      top: int = 3) -> list[tuple[str, float]]:
        """The concepts ``latent`` matches best: [(concept, mean score)], best first."""
        j = METRICS.index(metric)
        got = []
        for c in self.concepts:
            v = self.means(c, reference)[j, latent]
            if self.concepts[c].n_images[reference] and not np.isnan(v):
                got.append((c, float(v)))
        return sorted(got, key=lambda cv: -cv[1])[:top]

    def beats(self, concept: str, metric: str = "iou") -> dict[str, Any] | None:
        """Held-out test: does ``concept``'s best latent segment it better than its saliency map?

        Images holding both a saliency map and a mask alternate into a selection half (even
        positions), where the latent with the best mean ``metric`` against the mask is picked,
        and an evaluation half (odd), where it competes with the saliency map image by image.
        None when there are fewer than two such images.
        """
        rec = self._get(concept)
        j = METRICS.index(metric)
        if len(rec.paired) < 2:
            return None
        lat = np.stack([p[0][j] for p in rec.paired])  # (n, d_sae)
        sal = np.array([p[1][j] for p in rec.paired])
        sel, ev = lat[0::2], slice(1, None, 2)
        choice = _nanmean(sel, axis=0)
        if np.all(np.isnan(choice)):
            return None
        best = int(np.argmax(np.nan_to_num(choice, nan=-np.inf)))
        lv, sv = lat[ev, best], sal[ev]
        ok = ~(np.isnan(lv) | np.isnan(sv))
        if not ok.any():
            return None
        return {"latent": best, "metric": metric, "n_select": int(sel.shape[0]), "n_eval": int(ok.sum()),
                "latent_score": float(lv[ok].mean()), "saliency_score": float(sv[ok].mean()),
                "win_rate": float((lv[ok] > sv[ok]).mean())}

    def saliency_baseline(self, concept: str) -> dict[str, float] | None:
        """Mean scores of the saliency map itself against the mask, over images holding both."""
        rec = self._get(concept)
        if not rec.saliency_vs_mask:
            return None
        mean = _nanmean(np.stack(rec.saliency_vs_mask), axis=0)
        return {m: float(mean[j]) for j, m in enumerate(METRICS)}

    def table(self, metric: str = "iou", top: int = 5) -> list[dict[str, Any]]:
        """Rows (concept, ranked_by, rank, latent, n_images, <reference>_<metric> scores) of the best latents."""
        rows = []
        for c in sorted(self.concepts):
            rec = self.concepts[c]
            means = {r: self.means(c, r) for r in REFERENCES}
            for ref in REFERENCES:
                if not rec.n_images[ref]:
                    continue
                for rank, lat in enumerate(self.ranking(c, ref, metric, top), start=1):
                    row: dict[str, Any] = {"concept": c, "ranked_by": f"{ref}_{metric}", "rank": rank, "latent": lat,
                                           "n_images": rec.n_images[ref]}
                    for r in REFERENCES:
                        for j, m in enumerate(METRICS):
                            v = means[r][j, lat]
                            row[f"{r}_{m}"] = None if not rec.n_images[r] or np.isnan(v) else round(float(v), 6)
                    rows.append(row)
        return rows

    def save(self, path: str | Path) -> Path:
        """Write the accumulated scores to an ``.npz`` file (atomically), to browse or re-rank later."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        meta = {"d_sae": self.d_sae, "eval_size": self.size[0], "tau": self.tau, "concepts": list(self.concepts)}
        for i, rec in enumerate(self.concepts.values()):
            for ref in REFERENCES:
                arrays[f"c{i}_{ref}_sums"], arrays[f"c{i}_{ref}_counts"] = rec.sums[ref], rec.counts[ref]
            arrays[f"c{i}_n_images"] = np.array([rec.n_images[r] for r in REFERENCES])
            arrays[f"c{i}_saliency_vs_mask"] = np.array(rec.saliency_vs_mask).reshape(-1, len(METRICS))
            arrays[f"c{i}_paired_latents"] = np.array([p[0] for p in rec.paired], dtype=np.float32).reshape(
                -1, len(METRICS), self.d_sae)
            arrays[f"c{i}_paired_saliency"] = np.array([p[1] for p in rec.paired]).reshape(-1, len(METRICS))
        path.parent.mkdir(parents=True, exist_ok=True)
        from extraction.files import atomic_path

        with atomic_path(path, ext=".npz") as tmp:  # numpy adds .npz to a name without it
            np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> AlignmentTable:
        """Read a table written by ``save``."""
        if not Path(path).exists():
            raise FileNotFoundError(f"alignment file {str(path)!r} does not exist (write one with `revelio compare`)")
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            table = cls(meta["d_sae"], meta["eval_size"], meta["tau"])
            for i, c in enumerate(meta["concepts"]):
                rec = table._record(c)
                for ref in REFERENCES:
                    rec.sums[ref], rec.counts[ref] = z[f"c{i}_{ref}_sums"], z[f"c{i}_{ref}_counts"]
                rec.n_images = {r: int(n) for r, n in zip(REFERENCES, z[f"c{i}_n_images"])}
                rec.saliency_vs_mask = list(z[f"c{i}_saliency_vs_mask"])
                rec.paired = list(zip(z[f"c{i}_paired_latents"], z[f"c{i}_paired_saliency"]))
        return table

    def summary(self, metric: str = "iou", top: int = 5) -> dict[str, Any]:
        """Everything per concept (best latents, saliency baseline, held-out comparison) plus the overall win rate."""
        out: dict[str, Any] = {"metric": metric, "tau": self.tau, "eval_size": self.size[0], "concepts": {}}
        wins = []
        for c in sorted(self.concepts):
            rec = self.concepts[c]
            b = self.beats(c, metric)
            out["concepts"][c] = {
                "n_images": dict(rec.n_images),
                "best_latents": {ref: self.ranking(c, ref, metric, top) for ref in REFERENCES if rec.n_images[ref]},
                "saliency_vs_mask": self.saliency_baseline(c),
                "best_latent_vs_saliency": b,
            }
            if b is not None:
                wins.append(b["latent_score"] > b["saliency_score"])
        out["concepts_where_best_latent_beats_saliency"] = {"count": int(sum(wins)), "of": len(wins)}
        return out


def align_store(store: Any, model: Any, rows: Sequence[int], samples: Sequence[Sample],
                saliency: SaliencyMaps | None = None, vocabulary: Sequence[str] | None = None, eval_size: int = 64,
                tau: float = M.DEFAULT_TAU, batch_size: int = 8, progress: bool = True) -> AlignmentTable:
    """Score every latent of ``model`` on store ``rows`` (whose data-set ``samples`` are given, same order).

    Feature maps come from the store at the SAE's site; saliency maps (optional) from ``saliency``.
    """
    from tqdm.auto import tqdm

    from .feature_maps import store_feature_maps

    if len(rows) != len(samples):
        raise ValueError(f"got {len(rows)} rows but {len(samples)} samples")
    table = AlignmentTable(model.d_sae, eval_size=eval_size, tau=tau)
    bar = tqdm(total=len(rows), unit="img", desc="compare", disable=not progress, dynamic_ncols=True)
    try:
        for b0 in range(0, len(rows), batch_size):
            r = np.asarray(rows[b0:b0 + batch_size], dtype=np.int64)
            batch = list(samples[b0:b0 + batch_size])
            concepts = [image_concepts(s, vocabulary) for s in batch]
            sal = saliency(batch, concepts) if saliency is not None else [{} for _ in batch]
            for i, s in enumerate(batch):  # one image's (d_sae, h, w) maps at a time: bounded memory
                table.add(store_feature_maps(store, model, r[i:i + 1])[0], sal[i], s.masks, concepts[i])
            bar.update(len(r))
    finally:
        bar.close()
    return table
