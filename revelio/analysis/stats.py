"""Per-latent statistics over a store: how often each latent fires, its top images, their labels.

One pass over the store encodes every position of every image and keeps, per image and
latent, the peak activation over positions (``peak``, n x d_sae) and the number of positions
where the latent fires. Everything the feature browser shows is derived from those:

* frequency: fraction of all positions (tokens) where the latent is non-zero;
* image frequency: fraction of images where it fires anywhere;
* top images: the images with the highest peak;
* purity: share of the top images that carry the most common label among them, and the
  label entropy (bits) of the same images; monosemantic latents are pure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class LatentStats:
    """Activation statistics of every latent of one SAE on one store (see module docstring)."""

    hook: str
    timestep: int
    rows: np.ndarray  # (n,) store rows, increasing
    labels: np.ndarray  # (n,) label of each row (-1: none)
    peak: np.ndarray  # (n, d_sae) max activation over positions
    fired: np.ndarray  # (n, d_sae) positions where the latent is non-zero
    positions: int  # positions per image

    @property
    def d_sae(self) -> int:
        return int(self.peak.shape[1])

    @property
    def frequency(self) -> np.ndarray:
        """(d_sae,) fraction of positions (tokens) where each latent fires."""
        return self.fired.sum(axis=0) / max(1, self.fired.shape[0] * self.positions)

    @property
    def image_frequency(self) -> np.ndarray:
        """(d_sae,) fraction of images where each latent fires somewhere."""
        return (self.fired > 0).mean(axis=0) if len(self.rows) else np.zeros(self.d_sae)

    def top_images(self, latent: int, k: int = 8) -> np.ndarray:
        """Indices into ``rows`` of the ``k`` images with the highest peak of ``latent`` (only where it fires)."""
        self._check(latent)
        col = self.peak[:, latent]
        order = np.argsort(-col, kind="stable")[:k]
        return order[col[order] > 0]

    def label_counts(self, latent: int, k: int = 8) -> dict[int, int]:
        """Label -> count among the latent's top ``k`` images (unlabelled images are left out)."""
        labs = self.labels[self.top_images(latent, k)]
        return dict(Counter(int(x) for x in labs if x >= 0).most_common())

    def purity_entropy(self, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(d_sae,) purity and (d_sae,) label entropy in bits of each latent's top-``k`` labelled images.

        Purity is the share of the commonest label (``probes.label_purity_entropy``); NaN where a
        latent has no labelled top image.
        """
        from probes import label_purity_entropy

        n_classes = int(self.labels.max()) + 1 if len(self.labels) and self.labels.max() >= 0 else 1
        pur, ent = np.full(self.d_sae, np.nan), np.full(self.d_sae, np.nan)
        for j in range(self.d_sae):
            labs = self.labels[self.top_images(j, k)]
            pur[j], ent[j] = label_purity_entropy(labs[labs >= 0], n_classes)
        return pur, ent

    def histogram(self, latent: int, bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) of the latent's per-image peak activation over the images where it fires."""
        self._check(latent)
        v = self.peak[:, latent]
        v = v[v > 0]
        return np.histogram(v, bins=bins) if v.size else (np.zeros(bins, dtype=np.int64), np.linspace(0, 1, bins + 1))

    def _check(self, latent: int) -> None:
        if not 0 <= int(latent) < self.d_sae:
            raise IndexError(f"latent {latent} out of range [0, {self.d_sae})")


def latent_stats(store: Any, model: Any, rows: Sequence[int] | np.ndarray | None = None, batch_size: int | None = None,
                 progress: bool = True, max_positions: int = 8192) -> LatentStats:
    """One pass over ``rows`` (default: every done row) of ``store`` at the SAE's site.

    ``batch_size`` images are encoded at once (default: as many as fit ``max_positions`` positions,
    which bounds the dense (positions x d_sae) codes in memory).
    """
    import torch
    from tqdm.auto import tqdm

    from .feature_maps import require_spatial, encode_tokens, sae_site

    hook, t = sae_site(model)
    require_spatial(store, hook, t)
    rows = np.flatnonzero(store.done) if rows is None else np.asarray(rows, dtype=np.int64)
    h, w = store.spatial(hook, t)
    p = h * w
    batch_size = batch_size or max(1, max_positions // p)
    peak = np.zeros((len(rows), model.d_sae), dtype=np.float32)
    fired = np.zeros((len(rows), model.d_sae), dtype=np.int32)
    for b0 in tqdm(range(0, len(rows), batch_size), desc="latent stats", unit="batch", disable=not progress,
                   dynamic_ncols=True):
        r = rows[b0:b0 + batch_size]
        x, _ = store.tokens(hook, t, r)
        codes = torch.from_numpy(encode_tokens(model, x)).view(len(r), p, -1)
        peak[b0:b0 + len(r)] = codes.amax(dim=1).numpy()
        fired[b0:b0 + len(r)] = (codes > 0).sum(dim=1).numpy()
    labels = store.labels[rows] if len(rows) else np.zeros(0, dtype=np.int64)
    return LatentStats(hook=hook, timestep=t, rows=rows, labels=labels, peak=peak, fired=fired, positions=p)


def timestep_profile(store: Any, model: Any, rows: Sequence[int] | np.ndarray, progress: bool = False,
                     max_positions: int = 8192) -> dict[int, dict[str, np.ndarray]]:
    """Per timestep of the SAE's hook in ``store``: each latent's mean per-image peak activation and the share of
    ``rows`` where it fires, ``{t: {"mean_peak": (d_sae,), "image_frequency": (d_sae,)}}``.

    Every timestep stored for the hook with per-position activations of the SAE's width is encoded (a
    timestep-aware SAE only at its own timesteps, with its per-timestep modulation), so the dashboard
    can show when along denoising a latent is active, also for an SAE trained at one timestep.
    """
    import torch
    from tqdm.auto import tqdm

    from .feature_maps import sae_site

    hook, _ = sae_site(model)
    rows = np.asarray(rows, dtype=np.int64)
    own = [int(t) for t in (getattr(model, "timesteps", None) or [])] if getattr(model, "conditioned", False) else None
    out: dict[int, dict[str, np.ndarray]] = {}
    for t in store.timesteps(hook):
        if store.layout(hook, t) == "NC" or store.d_in(hook, t) != model.d_in or (own is not None and t not in own):
            continue
        h, w = store.spatial(hook, t)
        p = h * w
        bs = max(1, max_positions // p)
        peak = np.zeros((len(rows), model.d_sae), dtype=np.float32)
        for b0 in tqdm(range(0, len(rows), bs), desc=f"timestep profile t={t}", unit="batch", disable=not progress,
                       dynamic_ncols=True):
            r = rows[b0:b0 + bs]
            x, _ = store.tokens(hook, t, r)
            with torch.no_grad():
                xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
                codes = torch.cat([model.encode(xt[i:i + 4096], timestep=t).float() for i in range(0, len(xt), 4096)])
            peak[b0:b0 + len(r)] = codes.view(len(r), p, -1).amax(dim=1).numpy()
        out[int(t)] = {"mean_peak": peak.mean(axis=0) if len(rows) else np.zeros(model.d_sae, np.float32),
                       "image_frequency": (peak > 0).mean(axis=0) if len(rows) else np.zeros(model.d_sae)}
    return out
