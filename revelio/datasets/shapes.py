"""``shapes``: a seeded procedural world with exact captions, labels and per-object masks.

Every image holds 1-3 coloured shapes on a textured background. Sample ``i`` depends
only on ``(seed, i)``, so any subset and any count are reproducible. The label is the
shape of the largest object; masks are given per shape word, per colour word, per
"colour shape" phrase and for "background".
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .base import ImageDataset, Sample

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star"]
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
NUMBER_WORDS = ["one", "two", "three"]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    def rot(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "square":
        a = r / math.sqrt(2) * 1.15
        return rot([(-a, -a), (a, -a), (a, a), (-a, a)])
    if shape == "triangle":
        return rot([(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "diamond":
        return rot([(0, -r), (0.65 * r, 0), (0, r), (-0.65 * r, 0)])
    if shape == "cross":
        a, b = r, r * 0.36
        return rot([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)])
    if shape == "star":
        pts = []
        for j in range(10):
            rr = r if j % 2 == 0 else r * 0.45
            t = -math.pi / 2 + j * math.pi / 5
            pts.append((rr * math.cos(t), rr * math.sin(t)))
        return rot(pts)
    return None  # circle


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted background: flat, vertical/horizontal gradient or low-contrast noise."""
    base = rng.uniform(60, 200, size=3)
    kind = rng.integers(0, 3)
    img = np.ones((size, size, 3)) * base
    if kind == 1:
        ramp = np.linspace(-30, 30, size)
        img += (ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None])
    elif kind == 2:
        img += rng.normal(0, 8, size=(size, size, 1))
    gray = img.mean(axis=2, keepdims=True)
    img = gray + 0.35 * (img - gray)  # desaturate so objects stand out by colour
    return np.clip(img, 0, 255)


LABELS = ("shape", "colour")


def phrase(colour: str, shape: str) -> str:
    """The caption wording of one object ("a red circle", "an orange star")."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


class Shapes(ImageDataset):
    """The procedural shapes world (see module docstring).

    ``rotate=False`` draws every object upright (the same layouts otherwise: positions, sizes, colours).

    ``label`` picks which attribute of the largest object is the integer label (and which
    words are each image's concepts): its ``shape`` (default) or its ``colour``.
    """

    name = "shapes"

    def __init__(self, size: int = 64, count: int = 1000, seed: int = 0, max_objects: int = 3, split: str = "train",
                 label: str = "shape", rotate: bool = True):
        if label not in LABELS:
            raise ValueError(f"shapes: label must be one of {', '.join(LABELS)}, got {label!r}")
        self.label = label
        self.class_names = list(SHAPES) if label == "shape" else list(COLORS)
        if size < 16:
            raise ValueError(f"shapes: size must be >= 16, got {size}")
        if not 1 <= max_objects <= 3:
            raise ValueError(f"shapes: max_objects must be 1..3, got {max_objects}")
        self.size, self.count, self.max_objects, self.rotate = size, count, max_objects, rotate
        # Splits draw from disjoint seed streams so train and test never share an image.
        self.seed = seed * 1000 + {"train": 0, "test": 1, "val": 2}.get(split, 3)
        self.split = split

    def __len__(self) -> int:
        return self.count

    def sample_id(self, i: int) -> str:
        return f"shapes-{self.split}-{self.seed}-{i:06d}"

    def layout(self, i: int) -> list[dict]:
        """The objects of sample ``i``: shape, colour, centre, radius, rotation (in pixels)."""
        rng = np.random.default_rng([self.seed, i])
        n = int(rng.integers(1, self.max_objects + 1))
        objs: list[dict] = []
        s = self.size
        tries = 0
        while len(objs) < n and tries < 200:
            tries += 1
            r = rng.uniform(0.12, 0.26 if n > 1 else 0.34) * s
            cx, cy = rng.uniform(r, s - r, size=2)
            if any(math.hypot(cx - o["cx"], cy - o["cy"]) < 0.85 * (r + o["r"]) for o in objs):
                continue
            colour = list(COLORS)[int(rng.integers(len(COLORS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if any(o["shape"] == shape and o["color"] == colour for o in objs):
                continue
            angle = float(rng.uniform(0, 2 * math.pi)) if shape != "circle" else 0.0  # drawn either way: same layouts
            objs.append(dict(shape=shape, color=colour, cx=cx, cy=cy, r=r, angle=angle if self.rotate else 0.0))
        objs.sort(key=lambda o: -o["r"])  # the first object is the largest: it sets the label
        bg_rng = np.random.default_rng([self.seed, i, 1])
        self._bg = _background(bg_rng, s)
        return objs

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.count:
            raise IndexError(f"shapes index {i} out of range [0, {self.count})")
        objs = self.layout(i)
        s = self.size
        labels = Image.new("I", (s, s), 0)
        draw = ImageDraw.Draw(labels)
        for k, o in enumerate(objs, start=1):
            poly = _polygon(o["shape"], o["cx"], o["cy"], o["r"], o["angle"])
            if poly is None:
                draw.ellipse([o["cx"] - o["r"], o["cy"] - o["r"], o["cx"] + o["r"], o["cy"] + o["r"]], fill=k)
            else:
                draw.polygon(poly, fill=k)
        lab = np.asarray(labels, dtype=np.int32)
        img = self._bg.copy()
        masks: dict[str, np.ndarray] = {}
        for k, o in enumerate(objs, start=1):
            m = lab == k
            img[m] = COLORS[o["color"]]
            for key in (o["shape"], o["color"], f"{o['color']} {o['shape']}"):
                masks[key] = masks.get(key, np.zeros_like(m)) | m
        masks["background"] = lab == 0
        phrases = [phrase(o["color"], o["shape"]) for o in objs]
        caption = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        key = "shape" if self.label == "shape" else "color"
        concepts = list(dict.fromkeys([o[key] for o in objs])) + ["background"]
        image = Image.fromarray(img.astype(np.uint8), "RGB")
        return Sample(image=image, caption=caption, label=self.class_names.index(objs[0][key]), id=self.sample_id(i),
                      masks=masks, concepts=concepts)
