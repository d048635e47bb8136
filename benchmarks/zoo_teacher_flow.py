"""Is tiny-flux's distillation target a good one? Sample the rectified-flow ODE with the teacher's velocity.

``flux.teacher`` trains tiny-flux on the velocity tiny-sd implies for each noisy latent (``EpsilonTeacher``). This
script integrates exactly that velocity field with tiny-flux's sampler (Euler over the student's noise levels,
true classifier-free guidance, in the student's latent coordinates; the levels snapped to the teacher's) and judges
the images with the zoo judge, beside the same judge on tiny-flux's own generations. If the teacher's field draws
the asked shapes and tiny-flux does not, the target is right and tiny-flux cannot fit it (capacity or inductive
bias), which more steps of the same training will not change.

    python benchmarks/zoo_teacher_flow.py --seeds 2 --threads 2
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from revelio.zoo import load_pipeline, shipped_path  # noqa: E402
from revelio.zoo.quality import ShapesJudge, all_pairs, generate  # noqa: E402
from revelio.zoo.train import EpsilonTeacher  # noqa: E402


@torch.no_grad()
def teacher_flow(teacher: EpsilonTeacher, vae, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                 batch_size: int = 24) -> list[np.ndarray]:
    scale, shift = float(vae.config.scaling_factor), float(vae.config.shift_factor)
    levels = torch.linspace(float(teacher.levels(scale)[-1]), 0.0, steps + 1)
    out = []
    for i in range(0, len(prompts), batch_size):
        p, sd = prompts[i:i + batch_size], seeds[i:i + batch_size]
        n = len(p)
        x = torch.cat([torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in sd])
        x = x * float(levels[0])  # x at the teacher's noisiest level (the clean part, about 6% of it, left out)
        for s, s_next in zip(levels[:-1], levels[1:]):
            t, exact, _ = teacher.match(s[None], scale)
            v = teacher.velocity(x.repeat(2, 1, 1, 1), t.repeat(2 * n), p + [""] * n, shift, scale)
            v = v[n:] + guidance * (v[:n] - v[n:])
            x = x + (float(s_next) - float(exact[0])) * v
        img = vae.decode(x / scale + shift).sample.clamp(-1, 1)
        out += [((im.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8) for im in img]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=2, help="noise seeds per colour x shape prompt")
    ap.add_argument("--steps", type=int, default=28, help="Euler steps (tiny-flux's default)")
    ap.add_argument("--guidance", type=float, default=4.0, help="true CFG scale (tiny-flux's default)")
    ap.add_argument("--teacher", default=str(shipped_path("tiny-sd")), help="the tiny-sd pipeline folder")
    ap.add_argument("--student", default="tiny-flux", help="the tiny-flux pipeline (zoo name or folder)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N colour x shape prompts (0: all 36)")
    ap.add_argument("--judge-images", type=int, default=600, help="real images the judge's shape classifier trains on")
    ap.add_argument("--grid", default="", help="write a PNG of the first 12 images of each here")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    student = load_pipeline(args.student)
    teacher = EpsilonTeacher(args.teacher, student.vae, "cpu")
    judge = ShapesJudge.fit(n_train=args.judge_images, n_val=max(30, args.judge_images // 2))
    pairs = all_pairs()[:args.limit] if args.limit else all_pairs()
    prompts = [f"a {p}" for p in pairs for _ in range(args.seeds)]
    seeds = [1000 + i for i in range(len(prompts))]
    want = [p for p in pairs for _ in range(args.seeds)]
    report, shown = {}, {}
    for name, images in (("teacher velocity field", teacher_flow(teacher, student.vae, prompts, seeds, args.steps,
                                                                 args.guidance)),
                         ("tiny-flux", generate(student, prompts, seeds, steps=args.steps, guidance=args.guidance))):
        s = judge.accuracy(images, want)
        report[name] = s
        shown[name] = (want[:12], images[:12])
        print(f"{name:24s} n={len(images)}  colour {s['colour']:.1%}  shape {s['shape']:.1%}", flush=True)
    ratio = report["tiny-flux"]["shape"] / max(1e-9, report["teacher velocity field"]["shape"])
    print(f"tiny-flux / teacher field shape accuracy: {ratio:.2f}x")
    if args.grid:
        import importlib.util

        spec = importlib.util.spec_from_file_location("zoo_quality", Path(__file__).with_name("zoo_quality.py"))
        quality = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(quality)
        print(f"grid -> {quality.grid(shown, args.grid, columns=12)}")
    return report


if __name__ == "__main__":
    main()
