"""Pictures: image grids, heat-map overlays. Matplotlib with the Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` atomically (temp file, then rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from extraction.files import make_tmp

    tmp = make_tmp(path, ext=path.suffix)  # savefig picks the format from the suffix
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def overlay(image: Image.Image | np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a heat map (any resolution, any range) over an RGB image; returns uint8 (H, W, 3)."""
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32) / 255.0
    h, w = img.shape[:2]
    heat = np.asarray(heat, dtype=np.float32)
    lo, hi = float(heat.min()), float(heat.max())
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    up = np.asarray(Image.fromarray((norm * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)) / 255.0
    colour = plt.get_cmap(cmap)(up)[..., :3]
    return (np.clip((1 - alpha) * img + alpha * colour, 0, 1) * 255).astype(np.uint8)


def sample_grid(samples, path: str | Path, columns: int = 8, show_masks: bool = False) -> Path:
    """A grid of data-set samples titled with their captions (and optional mask rows)."""
    rows = (len(samples) + columns - 1) // columns
    per = 2 if show_masks else 1
    fig, axes = plt.subplots(rows * per, columns, figsize=(1.9 * columns, 2.1 * rows * per), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, s in enumerate(samples):
        r, c = divmod(k, columns)
        ax = axes[r * per, c]
        ax.imshow(s.image)
        ax.set_title(s.caption, fontsize=6, wrap=True)
        if show_masks and s.masks:
            objs = [m for name, m in s.masks.items() if name != "background" and " " not in name]
            lab = np.zeros(objs[0].shape, dtype=np.float32) if objs else np.zeros((2, 2))
            for j, m in enumerate(objs, start=1):
                lab[m] = j
            axes[r * per + 1, c].imshow(lab, cmap="tab10", vmin=0, vmax=10, interpolation="nearest")
    return save_figure(fig, path)
