"""Image data sets behind one interface (``ImageDataset``): shapes, digits, folders, HF disk sets."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, field
from .base import ImageDataset, Sample, UnreadableImage, resize_center_crop, to_rgb
from .digits import Digits
from .folders import HFDiskDataset, ImageFolder
from .shapes import COLORS, SHAPES, Shapes

NAMES = ["shapes", "digits", "folder", "hf"]


@dataclass
class DataConfig:
    """Which images to use."""

    name: str = field("shapes", help="shapes | digits | folder | hf")
    path: str | None = field(None, help="root folder for 'folder' and 'hf'")
    size: int = field(64, min=1, help="image side in pixels (resize + centre crop)")
    count: int | None = field(256, min=1, help="number of images (null: all)")
    split: str = field("train", help="train | test (shapes, digits, hf)")
    seed: int = field(0, help="data seed (shapes world, digits split)")
    label: str = field("shape", help="shapes: the largest object's shape | colour is the label")
    caption_template: str = field("a photo of a {label}", help="caption for folder/hf images without one")


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Build the data set ``cfg`` names; an unknown name lists the valid ones."""
    if cfg.count is not None and cfg.count <= 0:  # the CLI refuses it at load; this guards Python callers
        raise ConfigError(f"data.count: {cfg.count!r} is out of range; it must be >= 1 (null: all)")
    if cfg.size <= 0:
        raise ConfigError(f"data.size: {cfg.size!r} is out of range; it must be >= 1")
    if cfg.name == "shapes":
        return Shapes(size=cfg.size, count=1000 if cfg.count is None else cfg.count, seed=cfg.seed, split=cfg.split, label=cfg.label)
    if cfg.name == "digits":
        return Digits(size=cfg.size, count=cfg.count, seed=cfg.seed, split=cfg.split)
    if cfg.name in ("folder", "hf"):
        if not cfg.path:
            raise ValueError(f"data set {cfg.name!r} needs data.path")
        if cfg.name == "folder":
            return ImageFolder(cfg.path, size=cfg.size, caption_template=cfg.caption_template, count=cfg.count)
        return HFDiskDataset(cfg.path, size=cfg.size, split=cfg.split, count=cfg.count, caption_template=cfg.caption_template)
    raise ValueError(f"unknown data set {cfg.name!r}; valid: {', '.join(NAMES)}")


__all__ = ["ImageDataset", "Sample", "UnreadableImage", "Shapes", "Digits", "ImageFolder", "HFDiskDataset",
           "DataConfig", "load_dataset", "SHAPES", "COLORS", "resize_center_crop", "to_rgb", "NAMES"]
