"""Saliency files: per-image ``.npz`` maps with their concept list, PNG overlays; all written atomically."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_write, write_text_atomic
from ..viz import overlay, save_figure

write_text = write_text_atomic  # name used by the saliency commands


def save_maps(path: str | Path, maps: np.ndarray, concepts: Sequence[str], **meta: str) -> Path:
    """Write ``maps`` (concepts, h, w) float32 and ``concepts`` (plus string metadata) to ``path`` (.npz), atomically."""
    path = Path(path)
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != len(concepts):
        raise ValueError(f"maps must be (concepts, h, w) with {len(concepts)} concepts, got {maps.shape}")
    with atomic_write(path, "wb") as f:
        np.savez(f, maps=maps, concepts=np.array(list(concepts), dtype=str),
                 **{k: np.array(str(v)) for k, v in meta.items()})
    return path


def load_maps(path: str | Path) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Read a file written by :func:`save_maps`: (maps, concepts, metadata)."""
    with np.load(path) as z:
        meta = {k: str(z[k]) for k in z.files if k not in ("maps", "concepts")}
        return z["maps"], [str(c) for c in z["concepts"]], meta


def save_overlays(path: str | Path, image: Image.Image, maps: np.ndarray, concepts: Sequence[str],
                  title: str = "") -> Path:
    """A PNG row: the image, then one heat-map overlay per concept, each map min-max normalised on its own
    (0 = its minimum, 1 = its maximum), with a colourbar that says so."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = len(concepts) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n + 0.6, 2.7), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title(textwrap.fill(title, 28), fontsize=7)
    for ax, m, c in zip(axes[0, 1:], maps, concepts):
        ax.imshow(overlay(image, m))
        ax.set_title(c, fontsize=8)
    for ax in axes[0]:
        ax.axis("off")
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=list(axes[0]), fraction=0.02, pad=0.01)
    bar.set_label("map, min-max normalised\nper concept (0 = min, 1 = max)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return save_figure(fig, path)
