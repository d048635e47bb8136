"""Segmentation data read from local files: ImageNet-Segmentation, PascalVOC, and the shapes world.

Every loader yields ``SegSample``: an RGB image, the foreground classes it holds and an
integer label map at the image's resolution (0 background, k + 1 = ``classes[k]``, 255 =
ignore, as in VOC's object boundaries).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..config import RevelioError
from ..datasets import Shapes, to_rgb
from .metrics import IGNORE

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
# Concept words for VOC class names that are not single everyday words.
VOC_WORDS = {"aeroplane": "airplane", "diningtable": "table", "motorbike": "motorbike", "pottedplant": "plant",
             "tvmonitor": "television"}


@dataclass
class SegSample:
    """One image with its ground truth."""

    id: str
    image: Image.Image
    classes: list[str]
    labels: np.ndarray  # (H, W) int: 0 background, k + 1 = classes[k], 255 ignore

    def mask(self, k: int = 0) -> np.ndarray:
        """Boolean mask of ``classes[k]``."""
        return self.labels == k + 1


class ImageNetSegmentation:
    """``gtsegs_ijcv.mat`` (Guillaumin et al. 2014): 4,276 ImageNet images with one foreground mask each.

    The file is a MATLAB struct ``value`` with fields ``img`` (N x 1 cell of H x W x 3 uint8),
    ``gt`` (N x 1 cell, each a 1 x 1 cell holding the H x W 0/1 mask) and ``id`` (N x 1 cell of
    synset strings, e.g. ``n02085620_10074``). The published file is MATLAB v7.3 (HDF5: cells are
    object references, arrays stored transposed); v5 files (``scipy.io.savemat``) are read too.
    Class names come from ``synset_names``, a ``LOC_synset_mapping.txt``-style file
    (``n02085620 Chihuahua, ...``; the first name is used); without it the class is ``object``.
    """

    name = "imagenet-seg"

    def __init__(self, path: str | Path, synset_names: str | Path | None = None, count: int | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} does not exist; pass the path of gtsegs_ijcv.mat")
        self.names = _read_synset_names(synset_names) if synset_names else {}
        import h5py

        self._h5 = h5py.is_hdf5(self.path)
        if self._h5:
            with h5py.File(self.path, "r") as f:
                n = f["value"]["img"].shape[0] if "value" in f else 0
        else:
            from scipy.io import loadmat

            self._mat = loadmat(self.path, squeeze_me=False)["value"][0, 0]
            n = self._mat["img"].shape[0]
        if n == 0:
            raise RevelioError(f"{self.path}: no /value/img in this file; is it gtsegs_ijcv.mat?")
        self.count = n if count is None else min(n, count)

    def __len__(self) -> int:
        return self.count

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        if not self._h5:
            img = np.asarray(self._mat["img"][i, 0])
            gt = np.asarray(self._mat["gt"][i, 0][0, 0])
            sid = str(np.asarray(self._mat["id"][i, 0]).ravel()[0])
            return img, gt, sid
        import h5py

        with h5py.File(self.path, "r") as f:
            v = f["value"]
            img = np.asarray(f[v["img"][i, 0]]).transpose(2, 1, 0)
            gt = np.asarray(f[f[v["gt"][i, 0]][0, 0]]).transpose(1, 0)
            chars = np.asarray(f[v["id"][i, 0]]).ravel()
            sid = "".join(chr(int(c)) for c in chars)
        return img, gt, sid

    def __iter__(self) -> Iterator[SegSample]:
        for i in range(self.count):
            img, gt, sid = self._read(i)
            cls = self.names.get(sid.split("_")[0], "object")
            labels = (np.asarray(gt) > 0).astype(np.int64)
            yield SegSample(id=f"imagenet-seg-{i:05d}-{sid}", image=to_rgb(Image.fromarray(img.astype(np.uint8))),
                            classes=[cls], labels=labels)


def _read_synset_names(path: str | Path) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            sid, _, names = line.strip().partition(" ")
            out[sid] = names.split(",")[0].strip().lower()
    return out


class PascalVOC:
    """PascalVOC 2012 segmentation: ``root/JPEGImages/<id>.jpg`` + palette PNG ``root/SegmentationClass/<id>.png``.

    The PNG's palette indices are the labels (0 background, 1..20 the classes of
    ``VOC_CLASSES``, 255 boundaries, ignored). ``split`` reads the ids from
    ``root/ImageSets/Segmentation/<split>.txt`` when that file exists, else every PNG.
    ``single_class`` keeps only images holding exactly one class (the paper's single-class set).
    """

    name = "voc"

    def __init__(self, root: str | Path, split: str = "val", count: int | None = None, single_class: bool = False):
        self.root = Path(root)
        seg = self.root / "SegmentationClass"
        if not seg.is_dir():
            raise FileNotFoundError(f"{seg} does not exist; pass the VOC2012 folder holding SegmentationClass/ "
                                    f"and JPEGImages/")
        listing = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        ids = listing.read_text().split() if listing.exists() else sorted(p.stem for p in seg.glob("*.png"))
        self.ids, self.count, self.single_class = ids, count, single_class

    def __iter__(self) -> Iterator[SegSample]:
        n = 0
        for sid in self.ids:
            if self.count is not None and n >= self.count:
                return
            labels_img = Image.open(self.root / "SegmentationClass" / f"{sid}.png")
            if labels_img.mode != "P":
                raise RevelioError(f"{sid}.png is not a palette PNG (mode {labels_img.mode}); VOC SegmentationClass "
                                   f"files hold class indices in a palette image")
            raw = np.asarray(labels_img).astype(np.int64)
            present = [int(c) for c in np.unique(raw) if 0 < c <= len(VOC_CLASSES)]
            if not present or (self.single_class and len(present) != 1):
                continue
            labels = np.where(raw == IGNORE, IGNORE, 0)
            for k, c in enumerate(present, start=1):
                labels[raw == c] = k
            image = to_rgb(Image.open(self.root / "JPEGImages" / f"{sid}.jpg"))
            yield SegSample(id=sid, image=image, classes=[VOC_WORDS.get(VOC_CLASSES[c - 1], VOC_CLASSES[c - 1])
                                                          for c in present], labels=labels)
            n += 1


class ShapesSegmentation:
    """The shapes world with its exact masks: classes are the shape words present, largest object first
    (``label="colour"``: the colour words present, each mask the union of the objects of that colour)."""

    name = "shapes"

    def __init__(self, count: int = 32, size: int = 64, seed: int = 0, split: str = "test", label: str = "shape"):
        self.shapes = Shapes(size=size, count=count, seed=seed, split=split, label=label)

    def __iter__(self) -> Iterator[SegSample]:
        for s in self.shapes.iter_samples():
            classes = [c for c in s.concepts if c != "background"]
            labels = np.zeros(s.masks["background"].shape, dtype=np.int64)
            for k, c in enumerate(classes, start=1):
                labels[s.masks[c]] = k
            yield SegSample(id=s.id, image=s.image, classes=classes, labels=labels)


def fit_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Resize + centre-crop a label map with the same geometry as the adapters' image preprocessing (nearest)."""
    img = ImageOps.fit(Image.fromarray(np.asarray(labels).astype(np.uint8)), (size, size), Image.NEAREST)
    return np.asarray(img).astype(np.int64)


DATASETS = ["shapes", "imagenet-seg", "voc"]
