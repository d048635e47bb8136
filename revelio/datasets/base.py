"""One interface for every image data set: indexable samples with image, caption, label, masks, id."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class UnreadableImage(Exception):
    """Raised by ``ImageDataset.__getitem__`` for a file that cannot be decoded."""

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"{sample_id}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


@dataclass
class Sample:
    """One image with what we know about it.

    ``masks`` maps a concept word ("circle", "red", "background", ...) to a boolean
    (H, W) array at the image's resolution; ``None`` when the data set has none.
    """

    image: Image.Image
    caption: str
    label: int
    id: str
    masks: dict[str, np.ndarray] | None = None
    concepts: list[str] = field(default_factory=list)


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA (composited on white) and CMYK images become RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` and crop the centre square (the paper's preprocessing)."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageDataset:
    """Base class: ``len``, ``[i] -> Sample`` (may raise ``UnreadableImage``), class names."""

    name: str = "dataset"
    class_names: list[str] = []

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def ids(self) -> list[str]:
        """Stable ids of every sample, without decoding images."""
        return [self.sample_id(i) for i in range(len(self))]

    def sample_id(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def iter_samples(self, indices: list[int] | None = None) -> Iterator[Sample]:
        """Yield readable samples; unreadable ones are skipped, counted and warned about."""
        self.skipped: list[str] = []
        for i in range(len(self)) if indices is None else indices:
            try:
                yield self[i]
            except UnreadableImage as e:
                self.skipped.append(e.sample_id)
                log.warning("skipping unreadable image %s (%s)", e.sample_id, e.reason)
        if self.skipped:
            log.warning("%d unreadable image(s) skipped in %s", len(self.skipped), self.name)
