"""Data sets on disk: an ImageFolder tree and a Hugging Face ``datasets`` folder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .base import (ImageDataset, Sample, UnreadableImage, array_to_rgb, check_size, open_image, resize_center_crop,
                   to_rgb)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class ImageFolder(ImageDataset):
    """``root/<class>/<image>``, like torchvision's ImageFolder; captions from a template.

    Files whose suffix is not an image are skipped (and counted) when the folder is
    scanned; files that fail to decode are skipped when read (``iter_samples``).
    """

    name = "folder"

    def __init__(self, root: str | Path, size: int = 64, caption_template: str = "a photo of a {label}",
                 count: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        self.class_names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.class_names:
            raise ValueError(f"image folder {str(self.root)!r} has no class subfolders (expected root/<class>/<image>)")
        self.files: list[tuple[Path, int]] = []
        self.non_images: list[Path] = []
        for label, cls in enumerate(self.class_names):
            for p in sorted((self.root / cls).rglob("*")):
                if p.is_file():
                    (self.files.append((p, label)) if p.suffix.lower() in IMAGE_SUFFIXES else self.non_images.append(p))
        if self.non_images:
            log.warning("skipped %d non-image file(s) in %s", len(self.non_images), self.root)
        if count is not None:
            self.files = self.files[:count]
        self.size = size
        self.caption_template = caption_template

    def __len__(self) -> int:
        return len(self.files)

    def sample_id(self, i: int) -> str:
        return str(self.files[i][0].relative_to(self.root))

    def __getitem__(self, i: int) -> Sample:
        path, label = self.files[i]
        img = open_image(path, self.sample_id(i))
        name = self.class_names[label]
        return Sample(image=resize_center_crop(img, self.size), caption=self.caption_template.format(label=name),
                      label=label, id=self.sample_id(i), concepts=[name])


class HFDiskDataset(ImageDataset):
    """A ``datasets.Dataset`` saved with ``save_to_disk``: an image column, optional label/caption/id."""

    name = "hf"

    def __init__(self, path: str | Path, size: int = 64, split: str | None = None, image_column: str = "image",
                 label_column: str = "label", caption_column: str = "caption", count: int | None = None,
                 caption_template: str = "a photo of a {label}"):
        import datasets as hfds

        if not Path(path).exists():
            raise FileNotFoundError(f"datasets folder {str(path)!r} does not exist")
        ds = hfds.load_from_disk(str(path))
        if isinstance(ds, hfds.DatasetDict):
            if split is None:
                split = "train" if "train" in ds else next(iter(ds))
            if split not in ds:
                raise ValueError(f"split {split!r} not in {str(path)!r}; available: {list(ds)}")
            ds = ds[split]
        if image_column not in ds.column_names:
            raise ValueError(f"no image column {image_column!r} in {str(path)!r}; columns: {ds.column_names}")
        if isinstance(ds.features.get(image_column), hfds.Image):
            # decode here (open_image), not inside `datasets`: a bomb or corrupt file is then one skipped sample
            ds = ds.cast_column(image_column, hfds.Image(decode=False))
        self.ds = ds if count is None else ds.select(range(min(count, len(ds))))
        self.size, self.image_column, self.label_column, self.caption_column = size, image_column, label_column, caption_column
        feat = ds.features.get(label_column)
        self.class_names = list(getattr(feat, "names", []) or [])
        self.caption_template = caption_template
        self.has_ids = "id" in ds.column_names

    def __len__(self) -> int:
        return len(self.ds)

    def sample_id(self, i: int) -> str:
        return str(self.ds[i]["id"]) if self.has_ids else f"{i:08d}"

    def __getitem__(self, i: int) -> Sample:
        row = self.ds[i]
        raw = row[self.image_column]
        sid = self.sample_id(i)
        if isinstance(raw, dict) and raw.get("bytes") is not None:
            import io

            img = open_image(io.BytesIO(raw["bytes"]), sid)
        elif isinstance(raw, dict) and raw.get("path"):
            img = open_image(raw["path"], sid)
        else:
            try:
                if isinstance(raw, Image.Image):
                    check_size(raw, sid)
                    raw.load()
                    img = to_rgb(raw)
                elif isinstance(raw, (np.ndarray, list)):
                    img = array_to_rgb(np.asarray(raw))
                else:
                    raise ValueError(f"unsupported image value of type {type(raw).__name__}")
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise UnreadableImage(sid, f"{type(e).__name__}: {e}") from e
        label = int(row[self.label_column]) if self.label_column in row and row[self.label_column] is not None else -1
        if self.caption_column in row and row[self.caption_column]:
            caption = str(row[self.caption_column])
        elif label >= 0 and self.class_names:
            caption = self.caption_template.format(label=self.class_names[label])
        else:
            caption = ""
        concepts = [self.class_names[label]] if label >= 0 and self.class_names else []
        return Sample(image=resize_center_crop(img, self.size), caption=caption, label=label, id=self.sample_id(i),
                      concepts=concepts)
