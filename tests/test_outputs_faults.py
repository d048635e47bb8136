"""Outputs under faults: one writer per output (real processes racing), stale locks, a full disk or an I/O error
at any point of extraction and of SAE checkpointing, the umask, temporaries of killed runs."""

import errno
import json
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from extraction import files as F
from extraction.store import StoreError, open_store
from revelio.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BIN = Path(sys.executable).parent
EXTRACT = ["extract", "--model.id", "tiny-sd", "--data.name", "shapes", "--data.size", "64", "--data.count", "8",
           "--data.seed", "3", "--hooks", "[mid_block,up_blocks.1]", "--timesteps", "[25]", "--batch_size", "2",
           "--storage_dtype", "float32", "--prompt", "caption", "--progress", "false"]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of EXTRACT (8 images, 4 batches of 2)."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(EXTRACT + ["--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _assert_same(a, b):
    with open_store(a) as x, open_store(b) as y:
        assert list(x.ids) == list(y.ids) and len(x.ids) == 8
        np.testing.assert_array_equal(x.labels, y.labels)
        assert x.keys() == y.keys()
        for h, t in x.keys():
            np.testing.assert_array_equal(x.read(h, t, slice(None)), y.read(h, t, slice(None)))


def _assert_done_rows_match(path, reference):
    """The done rows of an interrupted store are whole and equal to the reference's first rows."""
    with open_store(path, allow_incomplete=True) as st, open_store(reference) as ref:
        n = st.n_images
        assert list(st.ids[:n]) == list(ref.ids[:n])
        for h, t in ref.keys():
            np.testing.assert_array_equal(st.read(h, t, slice(0, n)), ref.read(h, t, slice(0, n)))
        return n


def _tmps(folder):
    return sorted(p.name for p in Path(folder).rglob(".*.tmp*"))


# ------------------------------------------------------------------------------------------------------------------
# 1. one writer per output
# ------------------------------------------------------------------------------------------------------------------


def _racer(path, barrier, results, hold_s):
    barrier.wait()
    try:
        with F.hold_output(path):
            results.put(("won", os.getpid(), ""))
            time.sleep(hold_s)
    except F.OutputLocked as e:
        results.put(("refused", os.getpid(), str(e)))


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_racing_writers_exactly_one_wins_and_losers_name_it(tmp_path, kind):
    """8 processes released by one barrier take the same lock, over 3 rounds (each round's winner releases
    while the next round's processes are already trying): exactly one wins per round, every loser names it."""
    target = tmp_path / ("store.h5" if kind == "file" else "run")
    if kind == "folder":
        target.mkdir()
    ctx = mp.get_context("fork")
    for _ in range(3):
        barrier, results = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_racer, args=(target, barrier, results, 1.0)) for _ in range(8)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
        winners = [g for g in got if g[0] == "won"]
        assert len(winners) == 1, got
        for state, _, msg in got:
            if state == "refused":
                assert f"is being written by process {winners[0][1]} on {socket.gethostname()}" in msg, msg
                assert str(F.lock_path(target)) in msg
    assert not F.lock_path(target).exists()  # released: the last holder removed its lock file


def test_two_extract_processes_same_out(reference, tmp_path):
    """Two real `revelio extract` runs started together on one --out: one finishes (equal to the reference),
    the other is refused at start with exit 2, naming the winner's pid."""
    out = tmp_path / "same.h5"
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, sys, time
        import revelio.cli, revelio.commands.extract, extraction.run, torch
        open(sys.argv[1], "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.002)
        sys.exit(revelio.cli.main({EXTRACT + ['--out', str(out)]!r}))
    """)
    # a barrier: both processes import everything, say so, then start together when `go` appears
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env()) for r in ready]
    t0 = time.time()
    while not all(r.exists() for r in ready):
        assert all(p.poll() is None for p in procs) and time.time() - t0 < 300, "a process died while importing"
        time.sleep(0.02)
    go.touch()
    res = []
    for p in procs:
        o, e = p.communicate(timeout=600)
        res.append((p.returncode, o, e, p.pid))
    codes = sorted(r[0] for r in res)
    assert codes == [0, 2], res
    (_, _, _, win_pid), (_, _, err, _) = sorted(res, key=lambda r: r[0])
    assert f"{out} is being written by process {win_pid}" in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("revelio: error:")
    _assert_same(out, reference)


def _holder(path, ready, *, h5=False):
    """A live process holding ``path``'s writer lock (and the HDF5 file open for writing when ``h5``)."""
    code = textwrap.dedent(f"""
        import sys, time, h5py
        from extraction.files import hold_output
        with hold_output({str(path)!r}):
            f = h5py.File({str(path)!r}, "r+") if {h5!r} else None
            open({str(ready)!r}, "w").close()
            time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], env=_env())
    t0 = time.time()
    while not Path(ready).exists():
        assert p.poll() is None and time.time() - t0 < 120, "holder did not start"
        time.sleep(0.05)
    return p


@pytest.mark.parametrize("command", [["sae", "fit"], ["probe"], ["compare"], ["saliency"], ["segment"], ["browse"],
                                     ["steer"], ["probe", "report"]])
def test_commands_refuse_an_output_held_by_another_process(tmp_path, capsys, command):
    out = tmp_path / ("steer.png" if command == ["steer"] else "out")
    p = _holder(out, tmp_path / "ready")
    try:
        assert main(command + ["--out", str(out)]) == 2
    finally:
        p.kill()
        p.wait()
    err = capsys.readouterr().err
    assert f"{out} is being written by process {p.pid}" in err and err.count("\n") == 1, err


def test_locked_store_reported_as_locked_and_finished_store_readers_never_blocked(reference, tmp_path, capsys):
    busy = tmp_path / "busy.h5"
    busy.write_bytes(reference.read_bytes())
    p = _holder(busy, tmp_path / "ready", h5=True)
    try:
        with pytest.raises(StoreError, match=f"busy.h5 is being written by process {p.pid} on "):
            open_store(busy)
        assert main(EXTRACT + ["--out", str(busy)]) == 2
        assert f"is being written by process {p.pid}" in capsys.readouterr().err
    finally:
        p.kill()
        p.wait()
    # a finished store: any number of readers at once, also while a writer holds its lock file (not the data)
    p = _holder(reference, tmp_path / "ready2")
    try:
        with open_store(reference) as a, open_store(reference) as b:
            assert a.n_images == b.n_images == 8
        code = f"from extraction.store import open_store; print(open_store({str(reference)!r}).n_images)"
        assert subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                              check=True).stdout.strip() == "8"
    finally:
        p.kill()
        p.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(reference, tmp_path, capsys):
    out = tmp_path / "stale.h5"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        F.lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                "command": "revelio extract (killed)", "started": "earlier"}))
        # temporaries of a killed run of this output (dead pid) go; a live process's temporary stays
        (tmp_path / f".stale.h5.{dead.pid}-0badc0de.tmp").write_bytes(b"half a skeleton")
        (tmp_path / f".stale.h5.{dead.pid}-0badc0df.tmp").mkdir()
        keep = tmp_path / f".stale.h5.{live.pid}-00000001.tmp"
        keep.write_bytes(b"someone else's")
        assert main(EXTRACT + ["--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert f"taking over the stale lock of process {dead.pid}" in err
        assert _tmps(tmp_path) == [keep.name]
        assert not F.lock_path(out).exists()
        _assert_same(out, reference)
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------------------------------------------
# 2. a full disk or an I/O error at any point of extraction
# ------------------------------------------------------------------------------------------------------------------

H5_ENOSPC = ("Can't synchronously write data (file write failed: time = now, filename = 'x', file descriptor = 4, "
             "errno = 28, error message = 'No space left on device', buf = 0x0, total write size = 8)")


def _inject(monkeypatch, point):
    """Make the ``point``-th write of a kind fail the way the OS / h5py reports it."""
    calls = {"n": 0}
    if point == "reserve":
        def fallocate(fd, off, n):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "posix_fallocate", fallocate)
        return r"no space left on device while reserving [0-9.]+ MB for {out}; free some space and rerun$"
    if point == "fsync":  # an I/O error while batch 3's rows are made durable
        real = os.fsync

        def fsync(fd):
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == "faulty.h5":
                calls["n"] += 1
                if calls["n"] == 5:  # 2 per batch (rows, then flags): the rows of batch 3
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(fd)
        monkeypatch.setattr(os, "fsync", fsync)
        return "input/output error while writing batch rows 4-5 of {out}$"
    if point == "finish":
        real = h5py.AttributeManager.__setitem__

        def setattr_(self, name, value):
            if name == "skipped":
                raise RuntimeError(H5_ENOSPC)
            return real(self, name, value)
        monkeypatch.setattr(h5py.AttributeManager, "__setitem__", setattr_)
        return "no space left on device while finishing {out}$"
    name = {"acts": "/acts/up_blocks.1/t25", "done": "/images/done"}[point]
    real = h5py.Dataset.__setitem__

    def setitem(self, key, value):
        if self.name == name and not (point == "done" and value is False):
            calls["n"] += 1
            if calls["n"] == 2:  # batch 2
                raise RuntimeError(H5_ENOSPC) if point == "acts" else OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    return "no space left on device while writing batch rows 2-3 of {out}$"


@pytest.mark.parametrize("point", ["reserve", "acts", "done", "fsync", "finish"])
def test_write_error_at_any_point_exit_2_keeps_done_rows_and_resumes_identically(reference, tmp_path, capsys,
                                                                                 monkeypatch, point):
    out = tmp_path / "faulty.h5"
    expect = _inject(monkeypatch, point)
    assert main(EXTRACT + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == err.splitlines()[-1] and re.fullmatch("revelio: error: " + expect.format(out=re.escape(str(out))),
                                                         err), err
    monkeypatch.undo()
    assert not F.lock_path(out).exists() and _tmps(tmp_path) == []
    if point == "reserve":
        assert not out.exists()  # nothing was committed: the skeleton never got into place
    else:
        n = _assert_done_rows_match(out, reference)
        assert n == {"acts": 2, "done": 2, "fsync": 4, "finish": 8}[point]
    assert main(EXTRACT + ["--out", str(out)]) == 0
    _assert_same(out, reference)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only); skipped where it cannot be mounted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the injected-error tests cover the same paths)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk, leave):
    """A ballast file that leaves ``leave`` bytes free on ``disk``."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return ballast


def test_full_tmpfs_uncompressed_refused_before_first_batch_then_resumes(reference, small_disk, capsys):
    out = small_disk / "u.h5"
    ballast = _fill(small_disk, reference.stat().st_size // 2)
    assert main(EXTRACT + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"no space left on device while reserving" in err and str(out) in err
    assert not out.exists() and _tmps(small_disk) == []
    ballast.unlink()
    # the space is reserved when the skeleton is created: a disk that fills up afterwards changes nothing
    ballast = None
    real_write = __import__("extraction.store", fromlist=["x"]).StoreWriter.write

    def write_then_fill(self, b):
        nonlocal ballast
        real_write(self, b)
        if ballast is None:
            ballast = _fill(small_disk, 0)
    import extraction.store as S
    S.StoreWriter.write = write_then_fill
    try:
        # every batch is written into the reserved space; only finishing needs a few kB and says so
        assert main(EXTRACT + ["--out", str(out)]) == 2
    finally:
        S.StoreWriter.write = real_write
    assert os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize < 64 << 10  # the disk filled up
    assert f"no space left on device while finishing {out} (needs" in capsys.readouterr().err
    assert _assert_done_rows_match(out, reference) == 8
    ballast.unlink()
    assert main(EXTRACT + ["--out", str(out)]) == 0
    _assert_same(out, reference)


def test_full_tmpfs_compressed_stops_cleanly_mid_run_then_resumes(reference, small_disk, capsys):
    out = small_disk / "c.h5"
    with open_store(reference) as ref:
        batch = sum(ref.read(h, t, slice(0, 2)).nbytes for h, t in ref.keys())
    ballast = _fill(small_disk, (1 << 20) + int(2.5 * batch))
    assert main(EXTRACT + ["--compression", "gzip", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no space left on device while writing batch rows" in err and str(out) in err, err
    n = _assert_done_rows_match(out, reference)
    assert 0 < n < 8
    ballast.unlink()
    assert main(EXTRACT + ["--compression", "gzip", "--out", str(out)]) == 0
    assert f"resuming after {n} done images" in capsys.readouterr().out
    _assert_same(out, reference)


# ------------------------------------------------------------------------------------------------------------------
# 2. SAE checkpoints on a full disk
# ------------------------------------------------------------------------------------------------------------------

SAE = ["--trainer.max_steps", "8", "--trainer.log_every_n_steps", "2", "--logging.checkpoint_every_n_steps", "2",
       "--logging.wandb_mode", "disabled", "--model.expansion", "2", "--model.k", "4", "--model.hist_every", "0",
       "--model.init_samples", "64", "--model.warmup_steps", "2", "--data.samples", "tokens", "--data.batch_size", "16",
       "--data.chunk_images", "4", "--data.buffer_chunks", "2", "--data.hook", "mid_block", "--data.timestep", "25",
       "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]


def test_sae_checkpoint_write_error_keeps_earlier_checkpoints_and_resumes(reference, tmp_path, capsys, monkeypatch):
    straight = tmp_path / "straight"
    assert main(["sae", "fit", "--data.store", str(reference), "--out", str(straight)] + SAE) == 0
    out = tmp_path / "faulty"
    real = torch.save

    def save(obj, f, *a, **k):
        if Path(getattr(f, "name", "")).name.startswith(".step00000006.ckpt."):  # half written, then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    assert main(["sae", "fit", "--data.store", str(reference), "--out", str(out)] + SAE) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"revelio: error: no space left on device while writing {out / 'checkpoints' / 'step00000006.ckpt'}"
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "step00000002.ckpt", "step00000004.ckpt"]
    assert torch.load(ck / "last.ckpt", weights_only=False)["global_step"] == 4
    assert main(["sae", "fit", "--data.store", str(reference), "--out", str(out), "--ckpt_path",
                 str(ck / "last.ckpt")] + SAE) == 0
    from safetensors.torch import load_file

    a, b = load_file(straight / "sae" / "sae_weights.safetensors"), load_file(out / "sae" / "sae_weights.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# 9. umask and temporaries of killed runs
# ------------------------------------------------------------------------------------------------------------------


def test_outputs_respect_the_umask(reference, tmp_path):
    from revelio.files import write_text_atomic
    from sae.io import save
    from sae.model import SparseAutoencoder

    old = os.umask(0o027)
    try:
        store = tmp_path / "s.h5"
        assert main(["extract", "--model.id", "tiny-sd", "--data.name", "shapes", "--data.size", "32", "--data.count",
                     "2", "--hooks", "[mid_block]", "--timesteps", "[25]", "--progress", "false",
                     "--out", str(store)]) == 0
        txt = write_text_atomic(tmp_path / "a" / "t.json", "{}")
        sae_dir = save(SparseAutoencoder(8, 16, 2), tmp_path / "sae")
    finally:
        os.umask(old)
    for p, mode in [(store, 0o640), (txt, 0o640), (sae_dir, 0o750), (sae_dir / "sae_weights.safetensors", 0o640),
                    (sae_dir / "cfg.json", 0o640)]:
        assert oct(p.stat().st_mode & 0o777) == oct(mode), p
    t = F.make_tmp(tmp_path / "x")
    assert t.stat().st_mode & 0o777 == 0o666 & ~F.current_umask()
