"""Which caption token does a UNet read each object from? DAAM maps of every token on noised real images.

On the shapes world, each multi-object test image is noised to ``--t`` and denoised once under its own caption
("a yellow square and a green cross") with DAAM tracing tiny-sd's cross-attention. For every object whose words
occur once in the caption, the average precision of its ground-truth mask is scored under three token maps:
its colour word, its shape noun, and the token right after the noun ("and", ",", or the end token for the last
object). The area of the mask is the AP a map blind to the image would get.

    HF_HUB_OFFLINE=1 python benchmarks/daam_token_routing.py --images 96 --figure docs/daam_tokens.png

This is the measurement behind docs/saliency.md's reading of DAAM's colour-word maps on tiny-sd.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from tqdm import tqdm

from revelio.datasets.shapes import Shapes
from revelio.saliency.real_image import daam_on_images
from revelio.zoo import load_pipeline, quiet_libraries


def phrases_in_order(sample) -> list[str]:
    """The sample's 'colour shape' phrases in caption order."""
    found = [p for p in sample.masks if " " in p and p in sample.caption]
    return sorted(found, key=sample.caption.find)


def token_maps(tc, shape: tuple[int, int]) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Every token's DAAM map resized to the mask ``shape``, and the key positions of each word."""
    maps = tc.maps()[0].float()
    maps = F.interpolate(maps[None], size=shape, mode="bilinear", align_corners=False)[0]
    pos: dict[str, list[int]] = defaultdict(list)
    for w, p in tc.words(0):
        pos[w].append(p)
    return maps, pos


def routing(pipe, images: int, seeds: list[int], t: int, seed: int = 0) -> dict[str, list[float]]:
    """AP lists keyed 'last object / <token>' and 'earlier object / <token>'."""
    out: dict[str, list[float]] = defaultdict(list)
    samples = list(Shapes(size=64, count=images, seed=seed, split="test", label="shape").iter_samples())
    for s in tqdm(samples, desc="daam token maps"):
        phrases = phrases_in_order(s)
        if len(phrases) < 2:
            continue
        tc = daam_on_images(pipe, [s.image], [s.caption], t=t, seeds=seeds, size=64)
        words = re.findall(r"[a-z]+", s.caption)
        maps, pos = token_maps(tc, np.asarray(s.masks[phrases[0]]).shape)
        for k, p in enumerate(phrases):
            colour, shape = p.split()
            if words.count(colour) != 1 or words.count(shape) != 1:
                continue  # a word used twice: its map mixes two objects
            mask = np.asarray(s.masks[p], dtype=bool)
            if not mask.any() or mask.all():
                continue
            noun = pos[shape][0]
            which = "last" if k == len(phrases) - 1 else "earlier"
            cands = {"colour word": pos[colour][0], "shape noun": noun, "token after the noun": [noun[-1] + 1]}
            for name, ps in cands.items():
                score = maps[ps].mean(0).numpy().ravel()
                out[f"{which} object / {name}"].append(average_precision_score(mask.ravel(), score))
            out[f"{which} object / mask area (blind map)"].append(float(mask.mean()))
    return out


def figure(pipe, path: str, t: int, seeds: list[int], count: int = 3) -> None:
    """Per-token maps of the first ``count`` multi-object test images (BOS left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in Shapes(size=64, count=12, seed=0, split="test", label="shape").iter_samples()
               if len(phrases_in_order(s)) == 2][:count]
    ncol = 10
    fig, ax = plt.subplots(len(samples), ncol + 1, figsize=(1.6 * (ncol + 1), 1.9 * len(samples)))
    for r, s in enumerate(samples):
        tc = daam_on_images(pipe, [s.image], [s.caption], t=t, seeds=seeds, size=64)
        maps = tc.maps()[0].float()
        toks = tc.tokens(0)
        ax[r, 0].imshow(s.image)
        ax[r, 0].set_title(s.caption.replace(" and ", "\nand "), fontsize=7)
        for c in range(ncol):
            k = c + 1  # skip the start token
            label, key = toks[k]
            ax[r, c + 1].imshow(maps[key].numpy(), cmap="jet")
            ax[r, c + 1].set_title(f"{k}: {label}", fontsize=8)
    for a in ax.flat:
        a.axis("off")
    fig.suptitle(f"tiny-sd DAAM map of each caption token (real images noised to t={t}; each map min-max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"figure -> {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd", help="a UNet pipeline: zoo name or folder")
    ap.add_argument("--images", type=int, default=96, help="shapes test images (the single-object ones are skipped)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds (maps averaged)")
    ap.add_argument("--t", type=int, default=500, help="noise timestep")
    ap.add_argument("--figure", default="", help="also write per-token maps of 3 images here (PNG)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    pipe = load_pipeline(args.model)
    res = routing(pipe, args.images, args.seeds, args.t)
    print(f"{args.model}, t={args.t}, seeds {args.seeds}: AP of each object's mask under one token's DAAM map")
    print(f"{'object / map':<46} {'AP':>6} {'n':>4}")
    for k in sorted(res):
        print(f"{k:<46} {100 * np.mean(res[k]):6.1f} {len(res[k]):>4}")
    if args.figure:
        figure(pipe, args.figure, args.t, args.seeds)


if __name__ == "__main__":
    main()
