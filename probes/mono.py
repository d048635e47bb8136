"""Monosemanticity of SAE latents: how consistent the labels of each latent's top-activating images are.

Per latent: firing frequency, label purity and entropy of its top-n images, and how cleanly it
separates one class from the rest (one-vs-rest AUROC of its activation, best class). Latents
that never fire are "dead" and get NaN purity/entropy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import ProbeError, check_X_y


def auroc_matrix(X: np.ndarray, y: np.ndarray, block: int = 1024) -> np.ndarray:
    """(n_classes, n_features) one-vs-rest AUROC of every feature for every class (ties count 1/2).

    Mann-Whitney form: AUROC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg).
    """
    from scipy.stats import rankdata

    X, y = check_X_y(X, y)
    classes = np.unique(y)
    out = np.zeros((len(classes), X.shape[1]))
    for j in range(0, X.shape[1], block):  # column blocks bound the memory of the rank matrix
        ranks = rankdata(X[:, j:j + block], axis=0)  # average ranks for ties
        for i, c in enumerate(classes):
            pos = y == c
            n_pos, n_neg = int(pos.sum()), int((~pos).sum())
            out[i, j:j + block] = (ranks[pos].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def top_rows(X: np.ndarray, n: int) -> np.ndarray:
    """(min(n, rows), cols) row indices of each column's ``n`` largest values, largest first.

    A partial sort (``argpartition``), so large (images x latents) code matrices need no full sort.
    """
    n = min(n, X.shape[0])
    idx = np.argpartition(-X, n - 1, axis=0)[:n] if n < X.shape[0] else np.broadcast_to(
        np.arange(X.shape[0])[:, None], X.shape).copy()
    vals = np.take_along_axis(X, idx, axis=0)
    order = np.lexsort((idx, -vals), axis=0)
    return np.take_along_axis(idx, order, axis=0)


def label_purity_entropy(labels: np.ndarray, n_classes: int) -> tuple[float, float]:
    """(purity, entropy in bits) of a label multiset: share of the commonest label, Shannon entropy."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    p = np.bincount(labels, minlength=n_classes) / len(labels)
    nz = p[p > 0]
    return float(p.max()), float(-(nz * np.log2(nz)).sum())


def monosemanticity(codes: np.ndarray, labels: np.ndarray, top_n: int = 16, token_frequency: np.ndarray | None = None,
                    class_names: list[str] | None = None, seed: int = 0, dense: bool = False) -> dict[str, Any]:
    """Per-latent report of image-level SAE ``codes`` (n_images, d_sae) against image ``labels``.

    The top images of a latent are its ``top_n`` highest-activating images among those where it
    fires (> 0). ``purity_shuffled`` repeats the purity with labels permuted (seeded): the value a
    latent blind to the labels would get with the same firing pattern. ``dense`` treats every
    image as firing (for the model's own channels, "neurons", whose pooled activations may be
    negative): the top images are then simply the ``top_n`` highest. Returns
    {"latents": [one dict per latent, ranked by AUROC], "summary": {...}}.
    """
    codes, y = check_X_y(codes, labels)
    if top_n < 1:
        raise ProbeError(f"top_n must be positive, got {top_n}")
    classes, yi = np.unique(y, return_inverse=True)
    names = [class_names[c] if class_names and 0 <= c < len(class_names) else str(c) for c in classes]
    n, d = codes.shape
    fires = np.ones(codes.shape, dtype=bool) if dense else codes > 0
    freq = fires.mean(axis=0)
    auc = auroc_matrix(codes, yi)
    shuffled = np.random.default_rng(seed).permutation(yi)
    order = top_rows(codes, top_n)  # (top_n, d)
    latents = []
    for j in range(d):
        top = order[:, j][fires[order[:, j], j]]
        purity, entropy = label_purity_entropy(yi[top], len(classes))
        shuffled_purity, _ = label_purity_entropy(shuffled[top], len(classes))
        best = int(np.argmax(auc[:, j]))
        dominant = int(np.argmax(np.bincount(yi[top], minlength=len(classes)))) if len(top) else -1
        latents.append({
            "latent": j, "frequency": float(freq[j]),
            "token_frequency": float(token_frequency[j]) if token_frequency is not None else None,
            "dead": not fires[:, j].any(), "n_top": int(len(top)),
            "purity": purity, "entropy_bits": entropy, "purity_shuffled": shuffled_purity,
            "dominant_class": names[dominant] if dominant >= 0 else None,
            "best_class": names[best], "auroc": float(auc[best, j]),
            "top_images": top.tolist(), "max_activation": float(codes[:, j].max()),
        })
    alive = [r for r in latents if not r["dead"]]
    latents.sort(key=lambda r: (r["dead"], -r["auroc"], r["latent"]))
    for rank, r in enumerate(latents):
        r["rank"] = rank
    pur = np.array([r["purity"] for r in alive]) if alive else np.array([np.nan])
    summary = {
        "n_latents": d, "n_images": n, "n_classes": len(classes), "top_n": top_n,
        "dead_fraction": 1.0 - len(alive) / d,
        "mean_purity": float(np.nanmean(pur)) if alive else float("nan"),
        "mean_purity_shuffled": float(np.nanmean([r["purity_shuffled"] for r in alive])) if alive else float("nan"),
        "mean_entropy_bits": float(np.nanmean([r["entropy_bits"] for r in alive])) if alive else float("nan"),
        "max_entropy_bits": float(np.log2(len(classes))),
        "fraction_purity_ge_0.9": float(np.mean(pur >= 0.9)) if alive else 0.0,
        # classes that have a latent with purity >= 0.9 over a full set of top_n images
        "classes_purity_ge_0.9": sorted({r["dominant_class"] for r in alive
                                         if r["purity"] >= 0.9 and r["n_top"] == min(top_n, n)}),
        "class_prior_max": float(np.bincount(yi).max() / n),
        "best_latent_per_class": {names[c]: int(np.argmax(np.where(fires.any(axis=0), auc[c], -1)))
                                  for c in range(len(classes))},
    }
    return {"latents": latents, "summary": summary}
