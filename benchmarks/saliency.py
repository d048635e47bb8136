"""Cost of saliency methods against the plain pipeline call on the same inputs, and their peak memory.

For each method: a full generation (``steps`` denoising steps) and a single denoiser forward
on a real image, each timed plain and traced, interleaved, median of ``--repeats`` after a
warm-up; the ratio traced / plain is printed. Peak memory of the work itself: on CUDA the
peak allocated bytes of each variant; on CPU, in a fresh process per variant, the peak
resident memory sampled every millisecond during the work minus the resident memory before.

    python benchmarks/saliency.py [--size 64] [--steps 4] [--repeats 5] [--device cpu]

Targets (issue 8): ConceptAttention with 10 concepts <= 1.3x, DAAM <= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

CONCEPTS = ["circle", "square", "triangle", "star", "cross", "diamond", "background", "sky", "grass", "tree"]
PROMPT = "a red circle and a blue square"
CASES = [  # (name, model, method)
    ("ConceptAttention, 10 concepts", "tiny-flux", "concept_attention"),
    ("ConceptAttention, 10 concepts", "tiny-sd3", "concept_attention"),
    ("DAAM (UNet cross-attention)", "tiny-sd", "daam"),
    ("DAAM-DiT (cross-attention)", "tiny-flux", "daam"),
]


def _tracer(pipe, method: str):
    from revelio.saliency import concept_attention, trace

    return concept_attention(pipe, CONCEPTS) if method == "concept_attention" else trace(pipe)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _work(pipe, kind: str, args, method: str | None, timer: list | None = None):
    """One unit of work, traced when ``method`` is given; appends its seconds to ``timer``.

    ``generate``: a whole pipeline call (prompt and concept encoding included on each side).
    ``denoise``: ONE denoiser call on a noised real image with a precomputed prompt; the trace
    is entered (concepts encoded) before the clock starts: the per-call cost of the method.
    """
    from contextlib import nullcontext

    from extraction.adapters import get_adapter

    ctx = _tracer(pipe, method) if method else nullcontext()
    ad = get_adapter(pipe)
    if kind == "generate":
        _sync(args.device)
        t = time.perf_counter()
    with ctx, torch.no_grad():
        if kind == "generate":
            pipe(PROMPT, num_inference_steps=args.steps, height=args.size, width=args.size, output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(0))
        else:
            noisy, cond = args._noisy[id(pipe)]
            _sync(args.device)
            t = time.perf_counter()
            ad.forward(noisy, 500, cond)
            _sync(args.device)
            if timer is not None:
                timer.append(time.perf_counter() - t)
    if kind == "generate" and timer is not None:
        _sync(args.device)
        timer.append(time.perf_counter() - t)


def _prepare(pipe, args) -> None:
    from extraction.adapters import get_adapter

    from revelio.datasets import Shapes

    ad = get_adapter(pipe)
    lat = ad.encode_images(ad.preprocess([Shapes(size=args.size, count=1)[0].image], args.size))
    args._noisy[id(pipe)] = (ad.noise(lat, 500, torch.Generator("cpu").manual_seed(0)), ad.encode_prompts([PROMPT]))


def timed(pipe, kind: str, args, method: str | None) -> float:
    out: list[float] = []
    _work(pipe, kind, args, method, out)
    return out[0]


def peak_memory(model: str, kind: str, method: str | None, args) -> float:
    """Peak memory in MiB of one unit of work (CUDA: peak allocated; CPU: max RSS of a fresh process)."""
    if args.device.startswith("cuda"):
        from revelio.zoo import load_pipeline

        pipe = load_pipeline(model, device=args.device)
        _prepare(pipe, args)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _work(pipe, kind, args, method)
        return torch.cuda.max_memory_allocated() / 2**20
    cmd = [sys.executable, __file__, "--_child", json.dumps([model, kind, method]), "--size", str(args.size),
           "--steps", str(args.steps), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def child(spec: str, args) -> None:
    from revelio.zoo import load_pipeline

    model, kind, method = json.loads(spec)
    pipe = load_pipeline(model, device=args.device)
    _prepare(pipe, args)
    _work(pipe, kind, args, None)  # warm-up: lazy initialisations are not the method's memory

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample)
    th.start()
    _work(pipe, kind, args, method)
    done.set()
    th.join()
    print((max(peak[0], rss()) - base) / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps of a generation")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args._noisy = {}
    if args._child:
        child(args._child, args)
        return
    from extraction.adapters import get_adapter
    from revelio.zoo import load_pipeline

    print(f"device={args.device} size={args.size}px steps={args.steps} repeats={args.repeats} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    header = f"{'method':<32} {'model':<10} {'work':<9} {'plain s':>9} {'traced s':>9} {'ratio':>6}"
    if not args.no_memory:
        header += f" {'plain MiB':>10} {'traced MiB':>10}"
    print(header)
    pipes = {}
    for name, model, method in CASES:
        if model not in pipes:
            pipes[model] = load_pipeline(model, device=args.device)
            _prepare(pipes[model], args)
        pipe = pipes[model]
        limit = get_adapter(pipe).max_image_size()  # the position embedding's grid, in pixels (None: any)
        if limit and args.size > limit:
            print(f"{name:<32} {model:<10} (skipped: {args.size}px exceeds its position-embedding grid)")
            continue
        for kind in ("generate", "denoise"):
            timed(pipe, kind, args, None), timed(pipe, kind, args, method)  # warm-up
            plain, traced = [], []
            for _ in range(args.repeats):  # interleaved, so load drift hits both alike
                plain.append(timed(pipe, kind, args, None))
                traced.append(timed(pipe, kind, args, method))
            p, t = statistics.median(plain), statistics.median(traced)
            line = f"{name:<32} {model:<10} {kind:<9} {p:>9.4f} {t:>9.4f} {t / p:>5.2f}x"
            if not args.no_memory:
                line += f" {peak_memory(model, kind, None, args):>10.1f} {peak_memory(model, kind, method, args):>10.1f}"
            print(line, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
