"""Image-level features for probes via ``extraction.store``: pooled activations, SAE codes, random features."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ._checks import ProbeError, check_labels

log = logging.getLogger(__name__)


def labelled_rows(store: Any) -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels) of the store's done rows that carry a label; a store without labels is an error.

    Unlabelled rows (-1) among labelled ones are dropped with a warning.
    """
    rows = np.flatnonzero(store.done)
    labels = store.labels[rows]
    if len(rows) == 0:
        raise ProbeError(f"{store.path} holds no finished rows")
    if np.all(labels < 0):
        raise ProbeError(f"{store.path} has no labels (every /images/label is -1; data set "
                         f"{store.attrs.get('dataset', '?')!r}): probes need a labelled data set such as "
                         "data.name digits or shapes, or folder images sorted into class folders")
    keep = labels >= 0
    if not keep.all():
        log.warning("%s: dropping %d unlabelled row(s)", store.path, int((~keep).sum()))
    rows, labels = rows[keep], labels[keep]
    check_labels(labels)
    return rows, labels


def check_key(store: Any, hook: str, timestep: int) -> None:
    """Raise KeyError naming what the store has when (hook, timestep) is not in it."""
    store.d_in(hook, int(timestep))  # the store's KeyError lists its hooks / timesteps


def check_finite(store: Any, hook: str, timestep: int, rows: np.ndarray, x: np.ndarray,
                 owner: np.ndarray | None = None) -> None:
    """Raise ProbeError naming the image ids whose activations ``x`` hold NaN/inf.

    ``x`` has one row per entry of ``rows`` (pooled), or per sample with ``owner`` giving each sample's
    store row (tokens).
    """
    ok = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if ok.all():
        return
    bad_rows = np.unique(np.asarray(owner)[~ok] if owner is not None else np.asarray(rows)[~ok])
    ids = [str(store.ids[r]) for r in bad_rows]
    shown = ", ".join(ids[:20]) + (f" ... ({len(ids)} in all)" if len(ids) > 20 else "")
    raise ProbeError(f"{store.path}: NaN/inf activations at {hook} t={timestep} in {len(ids)} image(s): {shown}; "
                     "re-extract them or leave them out")


def pooled_features(store: Any, hook: str, timestep: int, rows: np.ndarray, grid: int = 1) -> np.ndarray:
    """(n, C) spatial mean of the activation maps (or tokens) of ``rows``; with ``grid`` > 1 the
    (n, C * grid * grid) means over a grid x grid partition of the map (coarse layout kept).
    NaN/inf activations are an error naming the images."""
    check_key(store, hook, timestep)
    x = store.pooled(hook, int(timestep), rows, grid=grid)
    check_finite(store, hook, int(timestep), rows, x)
    return x


def sae_input_kind(cfg: dict[str, Any], layout: str) -> str:
    """Whether an SAE was trained on pooled image vectors ("pooled") or on every position ("tokens")."""
    if layout == "NC":
        return "pooled"
    for key in ("samples", "input", "pooling"):
        v = cfg.get(key)
        if v in ("pooled", "mean", "tokens", "positions", "none"):
            return "pooled" if v in ("pooled", "mean") else "tokens"
    return "tokens"


def sae_key(store: Any, model: Any) -> tuple[str, int]:
    """The (hook, timestep) an SAE was trained on, checked against the store (present, same width)."""
    cfg = getattr(model, "cfg", {}) or {}
    hook, t = cfg.get("hook"), cfg.get("timestep")
    if hook is None or t is None:
        raise ProbeError("the SAE's cfg.json names no hook/timestep; it cannot be matched to a store's activations")
    check_key(store, hook, int(t))
    if store.d_in(hook, int(t)) != int(model.d_in):
        raise ProbeError(f"the SAE has d_in={model.d_in} but {hook} t={t} in {store.path} has "
                         f"{store.d_in(hook, int(t))} channels")
    return hook, int(t)


def sae_codes(store: Any, model: Any, rows: np.ndarray, batch_size: int = 64, device: str = "cpu",
              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Image-level SAE codes and per-latent token firing frequency.

    Returns (codes (n, d_sae), token_frequency (d_sae,)). For an SAE trained on positions, an
    image's code for a latent is its mean over the image's positions (the pooled-code analogue
    of pooled activations) and the frequency counts positions; for a pooled SAE both are per image.
    """
    import torch
    from tqdm.auto import tqdm

    hook, t = sae_key(store, model)
    kind = sae_input_kind(model.cfg, store.layout(hook, t))
    codes = np.zeros((len(rows), int(model.d_sae)), dtype=np.float32)
    fired = np.zeros(int(model.d_sae), dtype=np.int64)
    n_samples = 0
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), desc=f"SAE codes {hook} t={t}", disable=not progress):
            sel = rows[start:start + batch_size]
            if kind == "pooled":
                x = store.pooled(hook, t, sel)
                check_finite(store, hook, t, sel, x)
                z = model.encode(torch.from_numpy(x).to(device)).float().cpu().numpy()
                codes[start:start + len(sel)] = z
            else:
                x, owner = store.tokens(hook, t, sel)
                check_finite(store, hook, t, sel, x, owner)
                z = model.encode(torch.from_numpy(x).to(device)).float().cpu().numpy()
                per = len(x) // len(sel)
                codes[start:start + len(sel)] = z.reshape(len(sel), per, -1).mean(axis=1)
            fired += (z > 0).sum(axis=0)
            n_samples += len(z)
    return codes, fired / max(1, n_samples)


def random_features(X: np.ndarray, width: int, seed: int) -> np.ndarray:
    """Random ReLU features of ``X``: relu(X_std W + b), W ~ N(0, 1/d), b ~ N(0, 1), ``width`` columns.

    The baseline "a random nonlinear map of the same width as the diffusion features": what a
    probe gets from width alone, without learned structure.
    """
    if width < 1:
        raise ProbeError(f"width must be positive, got {width}")
    X = np.asarray(X, dtype=np.float64)
    mu, sd = X.mean(axis=0), X.std(axis=0)
    Xs = (X - mu) / np.where(sd > 0, sd, 1.0)
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((X.shape[1], width)) / np.sqrt(X.shape[1])
    b = rng.standard_normal(width)
    return np.maximum(Xs @ W + b, 0.0).astype(np.float32)


def _cells(size: int, grid: int) -> list[tuple[int, int]]:
    """Row (or column) spans of an adaptive ``grid`` partition of ``size`` pixels (as the store's grid pooling:
    cell i spans floor(i*size/g) .. ceil((i+1)*size/g))."""
    return [((i * size) // grid, -(-((i + 1) * size) // grid)) for i in range(grid)]


def _check_images(images: np.ndarray, grid: int) -> np.ndarray:
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ProbeError(f"images must be (n, H, W, 3) RGB in [0, 1], got shape {images.shape}")
    if grid < 1 or grid > min(images.shape[1:3]):
        raise ProbeError(f"grid must be in 1..{min(images.shape[1:3])} for {images.shape[1]}x{images.shape[2]} "
                         f"images, got {grid}")
    return images


def mean_colour(images: np.ndarray, grid: int = 1) -> np.ndarray:
    """(n, 3 * grid * grid) mean RGB of (n, H, W, 3) images in [0, 1], pooled like the features.

    ``grid`` 1: the image's mean colour; ``grid`` > 1: the mean colour of each cell of the same adaptive
    grid x grid partition the store uses for feature maps, flattened channel-major (R cells, G cells, B cells)
    as the store flattens (C, grid, grid). The pixel counterpart of the spatial mean of a feature map.
    """
    images = _check_images(images, grid)
    n, h, w, _ = images.shape
    out = np.empty((n, 3, grid, grid))
    for i, (r0, r1) in enumerate(_cells(h, grid)):
        for j, (c0, c1) in enumerate(_cells(w, grid)):
            out[:, :, i, j] = images[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out.reshape(n, -1).astype(np.float32)


def colour_histogram(images: np.ndarray, bins: int = 8, grid: int = 1, joint: bool = False) -> np.ndarray:
    """Colour histogram of (n, H, W, 3) images in [0, 1], pooled like the features (share of pixels per bin).

    A value v falls in bin ``min(floor(v * bins), bins - 1)``. Per channel (default): (n, 3 * bins * grid^2),
    each channel's ``bins`` shares summing to 1 per cell; ``joint``: one histogram over the ``bins**3`` RGB
    cubes, (n, bins**3 * grid^2). Cells as ``mean_colour``; features ordered (histogram bin, cell row, cell col).
    """
    if bins < 1:
        raise ProbeError(f"bins must be positive, got {bins}")
    images = _check_images(images, grid)
    n, h, w, _ = images.shape
    idx = np.minimum((np.clip(images, 0.0, 1.0) * bins).astype(np.int64), bins - 1)  # (n, H, W, 3)
    if joint:
        codes = (idx[..., 0] * bins + idx[..., 1]) * bins + idx[..., 2]  # (n, H, W) in [0, bins^3)
        width = bins ** 3
    else:
        width = 3 * bins
        codes = idx + np.arange(3) * bins  # (n, H, W, 3): channel c's bins are c*bins .. c*bins + bins-1
    out = np.empty((n, width, grid, grid))
    for i, (r0, r1) in enumerate(_cells(h, grid)):
        for j, (c0, c1) in enumerate(_cells(w, grid)):
            cell = codes[:, r0:r1, c0:c1].reshape(n, -1)
            flat = cell + (np.arange(n) * width)[:, None]
            counts = np.bincount(flat.ravel(), minlength=n * width).reshape(n, width)
            out[:, :, i, j] = counts / ((r1 - r0) * (c1 - c0))  # each channel's shares sum to 1
    return out.reshape(n, -1).astype(np.float32)
