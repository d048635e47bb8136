"""CLI start-up cost: CPU seconds of `revelio --help` and `revelio <cmd> --help`, against `python -c pass`.

Each invocation runs in a fresh subprocess (`python -m revelio ...`, the tree on PYTHONPATH as
`make bench` runs it); its CPU time (user + system) is read from
``resource.getrusage(RUSAGE_CHILDREN)`` before and after, so machine load changes wall time but
hardly the figure. The median of ``--repeats`` runs is printed per command, with the baseline of a
bare interpreter (`python -c pass`) and the difference. Target (issue 16): under 1 s of CPU each:
`--help` must not import torch, diffusers, lightning or transformers.

    python benchmarks/cli_startup.py [--repeats 3] [--commands "sae fit" extract ...]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMMANDS = ["", "extract", "sae fit", "sae eval", "probe", "saliency", "steer", "zoo train", "demo"]


def child_cpu(args: list[str]) -> float:
    """CPU seconds (user + sys) one subprocess running ``args`` used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_cpu(args: list[str], repeats: int) -> float:
    return statistics.median(child_cpu(args) for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--commands", nargs="*", default=DEFAULT_COMMANDS, help="commands ('' = bare `revelio --help`)")
    a = ap.parse_args()
    base = median_cpu([sys.executable, "-c", "pass"], a.repeats)
    print(f"baseline `python -c pass`: {base:.3f} s CPU (median of {a.repeats})")
    print(f"{'command':<28} {'CPU s':>7} {'- baseline':>11}")
    worst = 0.0
    for cmd in a.commands:
        args = [sys.executable, "-m", "revelio", *cmd.split(), "--help"]
        cpu = median_cpu(args, a.repeats)
        worst = max(worst, cpu)
        print(f"{('revelio ' + cmd + ' --help').replace('  ', ' '):<28} {cpu:>7.3f} {cpu - base:>11.3f}")
    print(f"worst: {worst:.3f} s CPU ({'under' if worst < 1.0 else 'OVER'} the 1 s target)")


if __name__ == "__main__":
    main()
