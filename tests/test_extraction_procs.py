"""Real processes: SIGKILL at a seeded random point then resume, and a 2-process torchrun (gloo) joined into one file.

The kill point is drawn from ``REVELIO_TEST_SEED`` (default 0), printed, so a failure can be replayed.
"""

import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from extraction.store import open_store

# slow: real subprocesses (a killed extraction and its resume, a 2-rank torchrun), about a minute each
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

BIN = Path(sys.executable).parent
CONFIG = {
    "model": {"id": "tiny-sd"},
    "data": {"name": "shapes", "size": 32, "count": 24, "seed": 3},
    "hooks": ["mid_block", "up_blocks.1"],
    "timesteps": [25, 500],
    "prompt": "caption",
    "batch_size": 2,
    "storage_dtype": "float32",
    "progress": False,
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run of CONFIG."""
    from revelio.commands.extract import ExtractConfig, extract_cmd
    from revelio.config import load

    import torch

    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        extract_cmd(load(ExtractConfig, overrides={**CONFIG, "out": str(out)}))
    finally:
        torch.set_num_threads(threads)
    return out, time.perf_counter() - t0


def _config_file(tmp_path):
    p = tmp_path / "extract.yaml"
    p.write_text(yaml.safe_dump(CONFIG))
    return p


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _assert_same(a, b):
    with open_store(a) as x, open_store(b) as y:
        assert list(x.ids) == list(y.ids) and len(x.ids) == CONFIG["data"]["count"]
        assert list(x.captions) == list(y.captions)
        np.testing.assert_array_equal(x.labels, y.labels)
        assert x.keys() == y.keys()
        for h, t in x.keys():
            got, want = x.read(h, t, slice(None)), y.read(h, t, slice(None))
            # batch 1 vs the reference's batches: float32 sums in another order, so the noise scales with the
            # activations' size (a wrong or shifted row differs by O(1) of it)
            scale = max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_sigkill_then_resume_equals_uninterrupted(reference, tmp_path):
    reference, _ = reference
    out = tmp_path / "killed.h5"
    # batch 1: one commit per image in the killed run (batch size does not change the data); the progress
    # bar on stderr tells how far it got, and it is killed right after a random number of images
    cmd = [str(BIN / "revelio"), "extract", "--config", str(_config_file(tmp_path)), "--out", str(out),
           "--batch_size", "1", "--progress", "true"]
    count = CONFIG["data"]["count"]
    seed = int(os.environ.get("REVELIO_TEST_SEED", "0"))
    rng = random.Random(seed)
    # the tiny model extracts tens of images a second and the bar redraws every 0.1 s, so a kill aimed at
    # image k can land a few images later; the target stays in the first half, and a run that got to the
    # end before the kill arrived (a loaded machine) is started again with a new target, at most 3 times
    for attempt in range(3):
        out.unlink(missing_ok=True)
        target = rng.randint(1, count // 2)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen, buf, t0 = -1, b"", time.time()
        while seen < target and proc.poll() is None and time.time() - t0 < 180:
            if not select.select([proc.stderr], [], [], 1.0)[0]:
                continue
            buf = (buf + os.read(proc.stderr.fileno(), 256))[-200:]
            counts = re.findall(rb"(\d+)/%d " % count, buf)
            seen = int(counts[-1]) if counts else -1
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        done_before = 0
        if out.exists():
            with h5py.File(out, "r") as f:
                done_before = int(f["images/done"][...].sum())
        print(f"seed {seed} attempt {attempt}: killed after the bar showed {seen} (target {target}): "
              f"{done_before} of {count} rows done")
        if alive and target <= seen < count and done_before < count:
            break
    # the kill landed mid-run: the run was still going, had got past the target, and had not finished
    assert alive and proc.returncode == -signal.SIGKILL, "the extraction ended before it could be killed"
    assert target <= seen < count and done_before < count
    from revelio.commands.extract import ExtractConfig, extract_cmd
    from revelio.config import load

    extract_cmd(load(ExtractConfig, overrides={**CONFIG, "out": str(out)}))
    _assert_same(out, reference)


def test_torchrun_two_ranks_join_equals_single_process(reference, tmp_path):
    reference, _ = reference
    out = tmp_path / "joined" / "acts.h5"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 500),
           str(BIN / "revelio"), "extract", "--config", str(_config_file(tmp_path)), "--out", str(out)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with h5py.File(out, "r") as f:
        assert f["acts/up_blocks.1/t500"].is_virtual and f.attrs["complete"]
        assert len(f["acts/up_blocks.1/t500"].virtual_sources()) == 2
    _assert_same(out, reference)
    # the joined folder can move as a whole: sources are relative
    moved = tmp_path / "moved"
    os.rename(out.parent, moved)
    _assert_same(moved / "acts.h5", reference)
