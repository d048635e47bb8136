"""Does a zoo model use the words of its prompt? Text sensitivity of its clean-image estimate per noise level.

Real single-object shapes images are noised to a few signal-to-noise ratios (the same noise for every
prompt); the denoiser's estimate of the clean image is decoded under the true caption ("a red circle"),
under the caption with the shape word swapped ("a red square", ...), with the colour word swapped
("a blue circle", ...), and under the empty prompt. Printed: the RMS pixel change (0-1 units) each swap
causes, averaged over swaps and images (``revelio.zoo.quality.text_sensitivity``). Noise levels are
matched by SNR, so a DDPM model (tiny-sd) and a rectified-flow model (tiny-flux) are compared at the
same amount of noise; the baseline is the other model measured the same way. Printed first, per model: how
far its text encoders put captions that differ in the shape word vs the colour word, in what the denoiser
reads (``revelio.zoo.quality.word_separation``; with ``--random-init`` the untrained encoders, the floor).
For Flux models it then prints where the image tokens' attention goes at SNR 0.2, per block
(``revelio.zoo.quality.attention_reach``): mass by Chebyshev offset to other image tokens, on the text, and
on the shape word's own T5 token.

    python benchmarks/zoo_text_use.py                               # the shipped tiny-sd and tiny-flux
    python benchmarks/zoo_text_use.py --models tiny-flux --ckpt zoo_checkpoints/tiny-flux-vae-f2-seed0.ckpt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from extraction.adapters import get_adapter
from revelio.datasets.shapes import phrase
from revelio.zoo import load_pipeline
from revelio.zoo.quality import attention_reach, real_images, text_sensitivity, word_separation


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-flux"])
    ap.add_argument("--ckpt", default=None, help="judge the EMA weights of a training checkpoint (one model)")
    ap.add_argument("--train-config", default="configs/zoo/train.yaml", help="the config the checkpoint was trained with")
    ap.add_argument("--images", type=int, default=12, help="real single-object images")
    ap.add_argument("--snrs", type=float, nargs="+", default=[0.02, 0.2, 1.0, 5.0])
    ap.add_argument("--random-init", action="store_true", help="untrained weights (a floor)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.ckpt and len(args.models) != 1:
        ap.error("--ckpt belongs to one model: pass --models tiny-sd or --models tiny-flux")
    if args.threads:
        torch.set_num_threads(args.threads)
    images, colours, shapes = real_images(args.images, seed=3)
    rows = []
    print(f"{'model':<10} {'SNR':>6} {'time':>6} {'shape':>7} {'colour':>7} {'empty':>7}   (RMS pixel change of the "
          "clean-image estimate)")
    for model in args.models:
        if args.ckpt:
            import yaml

            from revelio.config import from_dict
            from revelio.zoo.config import ZooTrainConfig
            from revelio.zoo.train import pipeline_from_checkpoint

            tcfg = from_dict(ZooTrainConfig, yaml.safe_load(Path(args.train_config).read_text()))
            pipe, step = pipeline_from_checkpoint(model, tcfg, args.ckpt)
            label = f"{model}@{step}"
        else:
            pipe, label = load_pipeline(model, random_init=args.random_init), model
        pipe.to(torch.float32)
        for key, sep in word_separation(pipe).items():
            rows.append({"model": label, "text": key} | sep)
            print(f"{label:<10} text encoding {key}: captions one shape word apart {sep['shape']:.2f}, one colour "
                  f"word apart {sep['colour']:.2f} (ratio {sep['ratio']:.2f})", flush=True)
        ad = get_adapter(pipe)
        if ad.kind == "flux":
            captions = [phrase(c, s) for c, s in zip(colours, shapes)]
            shape_pos = len(ad.word_encoder()[0].tokenize(captions[0])) - 1  # "a <colour> <shape>": the last word
            for row in attention_reach(pipe, images, captions, snr=0.2):
                rows.append({"model": label, "attention": row["block"]} | row)
                offsets = " ".join(f"{v:.2f}" for v in row["offsets"])
                print(f"{label:<10} attention {row['block']:<28} image offsets 0..: {offsets}  text {row['text']:.2f} "
                      f"(shape word {row['text_tokens'][shape_pos]:.3f})  top1 {row['top1']:.2f}", flush=True)
        for row in text_sensitivity(pipe, images, colours, shapes, tuple(args.snrs)):
            rows.append({"model": label} | row)
            print(f"{label:<10} {row['snr']:>6g} {row['time']:>6.3g} {row['shape']:>7.3f} {row['colour']:>7.3f} "
                  f"{row['empty']:>7.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
