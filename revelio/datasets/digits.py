"""``digits``: scikit-learn's bundled handwritten digits (real data, 10 classes), upsampled."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .base import ImageDataset, Sample

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class Digits(ImageDataset):
    """The 1,797 8x8 digits of ``sklearn.datasets.load_digits``; split 80/20 by a seeded permutation."""

    name = "digits"
    class_names = WORDS

    def __init__(self, size: int = 64, count: int | None = None, seed: int = 0, split: str = "train"):
        from sklearn.datasets import load_digits

        d = load_digits()
        order = np.random.default_rng(seed).permutation(len(d.target))
        cut = int(0.8 * len(order))
        if split not in ("train", "test", "all"):
            raise ValueError(f"digits: split must be 'train', 'test' or 'all', got {split!r}")
        idx = order[:cut] if split == "train" else order[cut:] if split == "test" else order
        if count is not None:
            if count > len(idx):
                raise ValueError(f"digits: asked for {count} images but split {split!r} holds {len(idx)}")
            idx = idx[:count]
        self.index = idx
        self.images = d.images
        self.targets = d.target
        self.size = size

    def __len__(self) -> int:
        return len(self.index)

    def sample_id(self, i: int) -> str:
        return f"digits-{int(self.index[i]):04d}"

    def __getitem__(self, i: int) -> Sample:
        j = int(self.index[i])
        arr = (self.images[j] / 16.0 * 255).astype(np.uint8)
        small = Image.fromarray(255 - arr, "L")  # dark ink on a light page
        img = small.resize((self.size, self.size), Image.BILINEAR).convert("RGB")
        ink = np.asarray(img.convert("L")) < 128
        label = int(self.targets[j])
        return Sample(image=img, caption=f"a handwritten digit {WORDS[label]}", label=label, id=self.sample_id(i),
                      masks={"digit": ink, "background": ~ink}, concepts=["digit", "background"])
