"""How much the reference-vs-ours choices move the saliency maps of the zoo models.

ConceptAttention (tiny-flux): each (encoding, modulation) choice against the reference default, on
held-out shapes images (real-image protocol: t = 500, one noise seed, concepts = the image's colour
or shape word + the background words). DAAM (tiny-sd): aggregation order "clamp_each_step" against
"reference". Prints the mean Pearson correlation of the maps (per image and concept) and how often
the argmax concept per pixel agrees.

    python benchmarks/saliency_choices.py [--count 16] [--label colour]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from revelio.saliency.real_image import concept_attention_on_images, daam_on_images  # noqa: E402
from revelio.segmentation import ShapesSegmentation  # noqa: E402
from revelio.segmentation.evaluate import BACKGROUND_WORDS, concept_list  # noqa: E402
from revelio.zoo import load_pipeline  # noqa: E402


def compare(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean Pearson r over concepts, argmax agreement) of two (C, h, w) maps."""
    rs = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ref, other) if a.std() > 0 and b.std() > 0]
    return float(np.mean(rs)), float((ref.argmax(0) == other.argmax(0)).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--label", default="colour", choices=["colour", "shape"])
    args = p.parse_args()
    torch.set_num_threads(1)
    data = list(ShapesSegmentation(count=args.count, size=64, seed=0, split="test", label=args.label))
    flux, sd = load_pipeline("tiny-flux"), load_pipeline("tiny-sd")
    choices = [("first_token", "zero_pooled"), ("mean", "prompt"), ("first_token", "prompt"), ("mean", "zero_pooled")]
    res: dict[str, list] = {f"{e} / {m}": [] for e, m in choices[1:]}
    daam = []
    for s in data:
        concepts = concept_list(s.classes[:1], BACKGROUND_WORDS)
        caption = "a " + s.classes[0]
        maps = {}
        for e, m in choices:
            ca = concept_attention_on_images(flux, [s.image], concepts, [caption], t=500, seeds=[0], size=64,
                                             encoding=e, modulation=m)
            maps[(e, m)] = ca.maps()[0].numpy()
        for e, m in choices[1:]:
            res[f"{e} / {m}"].append(compare(maps[choices[0]], maps[(e, m)]))
        words = "a " + ", ".join(concepts)
        a, b = (daam_on_images(sd, [s.image], [words], t=500, seeds=[0], size=64, order=o).word_maps(concepts).numpy()
                for o in ("reference", "clamp_each_step"))
        daam.append(compare(a, b))
    print(f"{len(data)} held-out shapes images, {args.label} words + background words, t=500, seed 0")
    print("ConceptAttention on tiny-flux, against the reference default (first_token / zero_pooled):")
    for name, v in res.items():
        r, agree = np.mean(v, axis=0)
        print(f"  {name:<26} Pearson r {r:.3f}  argmax agreement {agree:.1%}")
    r, agree = np.mean(daam, axis=0)
    print(f"DAAM on tiny-sd, clamp_each_step against reference order: Pearson r {r:.4f}  argmax agreement {agree:.1%}")


if __name__ == "__main__":
    main()
