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
    from extraction.files import atomic_path

    try:
        with atomic_path(path, ext=path.suffix) as tmp:  # savefig picks the format from the suffix
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def overlay(image: Image.Image | np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet",
            vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Blend a heat map (any resolution, any range) over an RGB image; returns uint8 (H, W, 3).

    The map is scaled linearly from ``vmin`` (bottom colour) to ``vmax`` (top colour), clipped; each
    defaults to the map's own min / max (min-max normalisation per map).
    """
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32) / 255.0
    h, w = img.shape[:2]
    heat = np.asarray(heat, dtype=np.float32)
    lo = float(heat.min()) if vmin is None else float(vmin)
    hi = float(heat.max()) if vmax is None else float(vmax)
    norm = np.clip((heat - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(heat)
    up = np.asarray(Image.fromarray((norm * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)) / 255.0
    colour = plt.get_cmap(cmap)(up)[..., :3]
    return (np.clip((1 - alpha) * img + alpha * colour, 0, 1) * 255).astype(np.uint8)


def mask_paint(masks: dict[str, np.ndarray], background: int = 128) -> np.ndarray:
    """(H, W, 3) uint8: each "<colour> <shape>" object mask painted in that colour, grey elsewhere."""
    from .datasets.shapes import COLORS

    first = np.asarray(next(iter(masks.values())))
    paint = np.full(first.shape + (3,), background, dtype=np.uint8)
    for name, m in masks.items():
        colour = COLORS.get(name.split()[0]) if " " in name else None
        if colour is not None:
            paint[np.asarray(m, dtype=bool)] = colour
    return paint


def sample_grid(samples, path: str | Path, columns: int = 8, show_masks: bool = False) -> Path:
    """A grid of data-set samples titled with their captions (wrapped, so 3-object captions stay apart) and
    optional mask rows: each object's mask painted in that object's own colour on grey (background)."""
    import textwrap

    rows = (len(samples) + columns - 1) // columns
    per = 2 if show_masks else 1
    lines = max([len(textwrap.wrap(s.caption, 24)) or 1 for s in samples] or [1])
    fig, axes = plt.subplots(rows * per, columns, figsize=(1.9 * columns, (1.9 + 0.14 * lines) * rows * per),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, s in enumerate(samples):
        r, c = divmod(k, columns)
        ax = axes[r * per, c]
        ax.imshow(s.image)
        ax.set_title("\n".join(textwrap.wrap(s.caption, 24)), fontsize=6.5)
        if show_masks and s.masks:
            objs = [(name, m) for name, m in s.masks.items() if " " in name]
            ax2 = axes[r * per + 1, c]
            ax2.imshow(mask_paint(s.masks), interpolation="nearest")
            ax2.set_title("\n".join(textwrap.wrap("masks: " + ", ".join(n for n, _ in objs), 30)), fontsize=5.5)
    fig.tight_layout()
    return save_figure(fig, path)
