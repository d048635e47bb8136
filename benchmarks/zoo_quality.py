"""Do the trained zoo models draw what they are asked? Colour and shape accuracy of generations.

For every single-object prompt "a <colour> <shape>" (held-out pairs never seen in training,
and seen pairs with fresh noise seeds) the model generates images that an independent
judge (``revelio.zoo.quality``: largest vivid blob -> nearest palette colour, mask features ->
a shape classifier trained on real shapes images) names. Prints a table, the per-shape recall
and confusion matrix of each group, and optionally writes a picture grid. ``--two N`` adds N
random two-object prompts ("a red circle and a blue square"), judged on the two largest blobs.

    python benchmarks/zoo_quality.py                       # both models, all pairs, 4 seeds
    python benchmarks/zoo_quality.py --grid docs/zoo_grid.png
    python benchmarks/zoo_quality.py --two 48                # plus 48 two-object prompts
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from revelio.datasets.shapes import COLORS, SHAPES
from revelio.zoo import load_pipeline, shipped_path
from revelio.zoo.quality import (ShapesJudge, all_pairs, caption, format_confusion, generate, real_images,
                                 real_two_object_images, reconstruct, two_object_accuracy,
                                 two_object_prompts)
from revelio.zoo.train import DEFAULT_HOLDOUT, TRAIN_CONFIG_FILE

DEFAULTS = {"tiny-sd": {"steps": 50, "guidance": 4.0}, "tiny-flux": {"steps": 28, "guidance": 4.0}}


def holdout_of(model: str) -> list[str]:
    """The pairs kept out of the model's training images (from its saved training config)."""
    folder = shipped_path(model)
    cfg_file = folder / TRAIN_CONFIG_FILE if folder else None
    if cfg_file and cfg_file.exists():
        return json.loads(cfg_file.read_text())["holdout"]
    return list(DEFAULT_HOLDOUT)


def grid_order(pair: str) -> tuple[int, int]:
    """Sort key spreading a grid over colours and shapes: pairs on the same colour-shape diagonal come first."""
    colour, shape = pair.split(" ")
    c, k = list(COLORS).index(colour), SHAPES.index(shape)
    return (k - c) % len(SHAPES), c


def grid(results: dict[str, tuple[list[str], list[np.ndarray]]], path: str, columns: int) -> Path:
    """One row per model, the first ``columns`` generations titled with their prompts."""
    import matplotlib.pyplot as plt

    from revelio.viz import save_figure

    fig, axes = plt.subplots(len(results), columns, figsize=(1.3 * columns, 1.55 * len(results)), squeeze=False)
    for r, (model, (prompts, images)) in enumerate(results.items()):
        for c in range(columns):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c])
                ax.set_title(prompts[c], fontsize=6)
        axes[r, 0].text(-8, 32, model, rotation=90, va="center", ha="right", fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    ap.add_argument("--pairs", default="both", choices=["heldout", "seen", "both"],
                    help="held-out colour x shape pairs, pairs seen in training (new seeds), or both")
    ap.add_argument("--seeds", type=int, default=4, help="noise seeds per pair")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N pairs of each group (0: all)")
    ap.add_argument("--steps", type=int, default=0, help="sampling steps (0: the model's default)")
    ap.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale (0: default)")
    ap.add_argument("--shift", type=float, default=0.0,
                    help="flow models: the sampler's time shift (FlowMatchEulerDiscreteScheduler shift; 0: the model's)")
    ap.add_argument("--random-init", action="store_true", help="score the untrained builds instead (a baseline)")
    ap.add_argument("--grid", default="", help="write a PNG grid of generations here")
    ap.add_argument("--json", default="", help="write the scores as JSON here")
    ap.add_argument("--judge-images", type=int, default=600, help="real images the judge's shape classifier trains on")
    ap.add_argument("--ceiling-images", type=int, default=300, help="real images judged after a VAE round trip")
    ap.add_argument("--two", type=int, default=0, help="random two-object prompts per model (0: none)")
    ap.add_argument("--confusion", action=argparse.BooleanOptionalAction, default=True,
                    help="print each group's per-shape confusion matrix")
    ap.add_argument("--vae", default="", help="only judge real images after a round trip through this VAE folder "
                                               "(e.g. zoo_checkpoints/vae-seed0), then stop")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--ckpt", default="", help="judge the EMA weights of a training checkpoint of the (one) model "
                                                "named by --models, assembled with --train-config's VAE")
    ap.add_argument("--train-config", default="configs/zoo/train.yaml", help="the training config of --ckpt")
    args = ap.parse_args(argv)
    if args.ckpt and len(args.models) != 1:
        ap.error("--ckpt judges one model: name it with --models tiny-sd (or tiny-flux)")
    if args.threads:
        torch.set_num_threads(args.threads)

    judge = ShapesJudge.fit(n_train=args.judge_images, n_val=max(30, args.judge_images // 2))
    # A second judge on other real images and another forest seed: where the two name different shapes for the
    # same generation, the outline is no clear shape and the first judge's call on it is luck (column "agree").
    judge2 = ShapesJudge.fit(n_train=args.judge_images, n_val=max(30, args.judge_images // 2), seed=2)
    print(f"judge on real shapes images: colour {judge.real_colour_accuracy:.1%}, shape {judge.real_shape_accuracy:.1%}")
    report: dict = {"judge": {"colour": judge.real_colour_accuracy, "shape": judge.real_shape_accuracy}}
    shown: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    if args.vae:
        from diffusers import AutoencoderKL

        real, colours, shapes = real_images(args.ceiling_images, seed=1)
        s = judge.accuracy(reconstruct(AutoencoderKL.from_pretrained(args.vae).eval(), real),
                           [f"{c} {k}" for c, k in zip(colours, shapes)])
        report["vae"] = s
        print(f"{args.vae}: real images after a round trip (n={s['n']}): colour {s['colour']:.1%}, shape {s['shape']:.1%}")
        print(format_confusion(s["confusion"]))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return report
    print(f"{'model':<10} {'pairs':<8} {'n':>4} {'colour':>7} {'shape':>7} {'both':>7} {'s/img':>6} {'agree':>6}")
    for model in args.models:
        if args.ckpt:
            import yaml

            from revelio.config import from_dict
            from revelio.zoo.config import ZooTrainConfig
            from revelio.zoo.train import pipeline_from_checkpoint

            tcfg = from_dict(ZooTrainConfig, yaml.safe_load(Path(args.train_config).read_text()))
            pipe, step = pipeline_from_checkpoint(model, tcfg, args.ckpt)
            held = list(tcfg.holdout)
            print(f"{model}: EMA weights of {args.ckpt} at step {step}")
            report[f"{model}/step"] = step
        else:
            pipe = load_pipeline(model, random_init=args.random_init)
            held = holdout_of(model)
        if args.shift:
            from diffusers import FlowMatchEulerDiscreteScheduler

            from extraction.adapters import get_adapter

            if not get_adapter(pipe).flow:
                ap.error(f"--shift is a rectified-flow sampler setting; {model} samples with "
                         f"{type(pipe.scheduler).__name__}")

            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=args.shift)
        groups = {"heldout": held, "seen": [p for p in all_pairs() if p not in held]}
        steps = args.steps or DEFAULTS[model]["steps"]
        guidance = args.guidance or DEFAULTS[model]["guidance"]
        first: tuple[list[str], list[np.ndarray]] = ([], [])
        real, colours, shapes = real_images(args.ceiling_images, seed=1)
        rec = reconstruct(pipe.vae, real)
        s = judge.accuracy(rec, [f"{c} {k}" for c, k in zip(colours, shapes)])
        report[f"{model}/vae-ceiling"] = s | {"judge_agreement": judge.agreement(judge2, rec)}
        print(f"{model:<10} {'vae-rec':<8} {s['n']:>4} {s['colour']:>7.1%} {s['shape']:>7.1%} {s['both']:>7.1%}"
              f" {'':>6} {report[f'{model}/vae-ceiling']['judge_agreement']:>6.1%}"
              f"  (real images through the VAE: the best a denoiser could reach)")
        if args.confusion:
            print(format_confusion(s["confusion"]))
        for group, pairs in groups.items():
            if args.pairs not in (group, "both"):
                continue
            pairs = pairs[: args.limit] if args.limit else pairs
            want = [p for p in pairs for _ in range(args.seeds)]
            seeds = [1000 + k for _ in pairs for k in range(args.seeds)]
            t0 = time.perf_counter()
            images = generate(pipe, [caption(*p.split(" ")) for p in want], seeds, steps, guidance)
            per = (time.perf_counter() - t0) / len(images)
            s = judge.accuracy(images, want)
            agree = judge.agreement(judge2, images)
            report[f"{model}/{group}"] = s | {"steps": steps, "guidance": guidance, "judge_agreement": agree}
            print(f"{model:<10} {group:<8} {s['n']:>4} {s['colour']:>7.1%} {s['shape']:>7.1%} {s['both']:>7.1%} {per:>6.2f}"
                  f" {agree:>6.1%}")
            if args.confusion:
                print(format_confusion(s["confusion"]))
            picked = sorted(range(len(pairs)), key=lambda i: grid_order(pairs[i]))[:6]
            first[0].extend(pairs[i] for i in picked)
            first[1].extend(images[i * args.seeds] for i in picked)
        if args.two:
            real2, wanted2 = real_two_object_images(min(args.two, 200), seed=1)
            s = two_object_accuracy(judge, reconstruct(pipe.vae, real2), wanted2)
            report[f"{model}/two-vae-ceiling"] = s
            print(f"{model:<10} real two-object images through the VAE n={s['n']}: both colours {s['colours']:.1%}, "
                  f"both shapes {s['shapes']:.1%}, colour+shape bound {s['bound']:.1%}")
            prompts, wanted = two_object_prompts(args.two, seed=0)
            images = generate(pipe, prompts, [2000 + i for i in range(args.two)], steps, guidance)
            s = two_object_accuracy(judge, images, wanted)
            report[f"{model}/two"] = s | {"steps": steps, "guidance": guidance}
            print(f"{model:<10} two objects n={s['n']}: both colours {s['colours']:.1%}, both shapes {s['shapes']:.1%}, "
                  f"colour+shape bound {s['bound']:.1%}, two blobs found {s['two_blobs']:.1%}")
        shown[model] = first
    if args.grid:
        print(f"grid -> {grid(shown, args.grid, columns=max(len(v[1]) for v in shown.values()))}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
