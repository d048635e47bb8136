"""One interface for every image data set: indexable samples with image, caption, label, masks, id."""

from __future__ import annotations

import logging
import warnings
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


# Larger images are refused (counted as unreadable) before their pixels are decoded: a small file can
# claim a huge size (a decompression bomb). PIL's own limit, which warns above it and fails at twice it.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def _scale_to_uint8(arr: np.ndarray, full_scale: float | None, what: str) -> np.ndarray:
    """``arr`` in [0, full_scale] to uint8 (rounded); ``full_scale`` None: min-max over the image, with a warning."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if full_scale is None:
        lo, hi = float(arr.min()), float(arr.max())
        log.warning("%s image with values in [%g, %g] (no known full scale): stretched to 0..255", what, lo, hi)
        arr, full_scale = arr - lo, (hi - lo) or 1.0
    return np.clip(np.rint(arr * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def array_to_rgb(arr: np.ndarray) -> Image.Image:
    """An (H, W), (H, W, 1|3|4) uint8 / uint16 / int / float array as an RGB image (floats in [0, 1], uint16 in 0..65535)."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"an image array must be (H, W) or (H, W, 1|3|4), got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = _scale_to_uint8(arr, _full_scale(arr), f"{arr.dtype} array")
    return to_rgb(Image.fromarray(arr))


def _full_scale(arr: np.ndarray) -> float | None:
    """The value that means white for ``arr``'s dtype and range (None: unknown, min-max it)."""
    finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if np.issubdtype(arr.dtype, np.floating):
        return 1.0 if lo >= 0 and hi <= 1 else None
    if arr.dtype == np.uint16 or (lo >= 0 and hi <= 65535):
        return 65535.0  # 16-bit data (PNG/TIFF greys arrive as I;16 or I)
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, scaled by the mode's full range.

    16-bit greys (I;16*) divide by 257 (65535 -> 255); 32-bit integer (I) images are read as 16-bit data
    when they lie in 0..65535 (how PIL decodes 16-bit PNG/TIFF greys), float (F) images as [0, 1]; other
    ranges are stretched min-max with a warning. 1-bit images map to 0 / 255; RGBA, LA and palette
    images with transparency are composited on white; grayscale, palette and CMYK convert as usual.
    (PIL's own ``convert("RGB")`` clips 16-bit and float values to 0..255 instead.)
    """
    if img.mode == "RGB":
        return img
    if img.mode in _16BIT or img.mode in ("I", "F"):
        arr = np.asarray(img)
        full = 65535.0 if img.mode in _16BIT else _full_scale(arr)
        return Image.fromarray(_scale_to_uint8(arr, full, f"mode {img.mode}"), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(source: object, sample_id: str) -> Image.Image:
    """Decode an image file (path or file object) to RGB; unreadable or oversized ones raise ``UnreadableImage``.

    The size check runs on the header, before any pixel is decoded, so a decompression bomb costs nothing.
    """
    from PIL import UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:  # type: ignore[arg-type]
                check_size(im, sample_id)
                im.load()
                img = to_rgb(im)
                return im.copy() if img is im else img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(sample_id, f"refused as a decompression bomb ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UnreadableImage(sample_id, f"{type(e).__name__}: {e}") from e


def check_size(img: Image.Image, sample_id: str) -> None:
    """Refuse an image of more than ``MAX_PIXELS`` pixels (raises ``UnreadableImage``, counted as unreadable)."""
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise UnreadableImage(sample_id, f"{w}x{h} = {w * h} pixels is more than the limit of {MAX_PIXELS} "
                                         "(decompression-bomb guard, revelio.datasets.base.MAX_PIXELS): refused")


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
