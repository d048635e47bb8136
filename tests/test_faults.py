"""Faults and bad input (issue 15): no path escapes, image depths, ranges, bad SAE folders, one-line errors,
resumed logs, non-finite metrics."""

import csv
import io
import json
import re
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import sae
from revelio.cli import main, run
from revelio.datasets import HFDiskDataset, ImageFolder
from revelio.datasets import base as image_base
from revelio.datasets.base import array_to_rgb, to_rgb
from revelio.paths import UniqueNames, inside, safe_name

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
       "OMP_NUM_THREADS": "1"}


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "revelio", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=ROOT)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The stderr of a failed command: exactly one line 'revelio: error: ...' and no traceback."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and lines[-1].startswith("revelio: error: "), res.stderr
    return lines[-1]


# --- 3. file names from data ---------------------------------------------------------------------------------

NASTY = ["../../escape", "/tmp/abs-escape", "a/b", "a\\b", "a:b", "nul\0byte", "..", ".", "", ".hidden",
         "x" * 300, "é" * 200, "-rf", "ok_name-1.2"]


def test_safe_name_is_one_component_and_keeps_ids_apart(tmp_path):
    names = [safe_name(n) for n in NASTY]
    for raw, n in zip(NASTY, names):
        assert n and n not in (".", "..") and not n.startswith((".", "-"))
        assert "/" not in n and "\\" not in n and "\0" not in n
        assert len(n.encode()) <= 120 and all(c.isascii() and (c.isalnum() or c in "._-") for c in n)
        assert inside(tmp_path, n + ".npz").parent == tmp_path
        (tmp_path / (n + ".npz")).write_bytes(b"")  # a real file system takes it (255-byte limit included)
    assert safe_name("ok_name-1.2") == "ok_name-1.2" and safe_name("up_blocks.1_t25") == "up_blocks.1_t25"
    assert len(set(names)) == len(names)  # "a/b", "a\\b" and "a:b" all sanitise to "a-b", plus distinct hashes
    assert safe_name("a/b") != safe_name("a:b") and safe_name("a/b") == safe_name("a/b")
    assert safe_name("x" * 300) != safe_name("x" * 301)  # cut to the same prefix, kept apart by the hash
    unique = UniqueNames()
    assert [unique("same"), unique("same"), unique("SAME")] == ["same", "same-2", "SAME-3"]
    with pytest.raises(ValueError, match="would leave the output folder"):
        inside(tmp_path, "../x")


def test_saliency_on_images_writes_only_under_out(tmp_path):
    datasets = pytest.importorskip("datasets")
    ids = ["../../escape", str(tmp_path / "abs-escape"), "a/b", "a:b", "nul\0byte", "y" * 300]
    imgs = [Image.new("RGB", (32, 32), (40 * i, 200, 255 - 40 * i)) for i in range(len(ids))]
    feats = datasets.Features({"image": datasets.Image(), "id": datasets.Value("string"),
                               "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": imgs, "id": ids, "caption": ["a red circle"] * len(ids)},
                               features=feats).save_to_disk(str(tmp_path / "data" / "ds"))
    out = tmp_path / "deep" / "er" / "out"
    before = {p for p in tmp_path.rglob("*")}
    written = run(["saliency", "--method", "daam", "--model.id", "tiny-sd", "--source", "images", "--data.name", "hf",
                   "--data.path", str(tmp_path / "data" / "ds"), "--data.count", "null", "--size", "32",
                   "--out", str(out), "--progress", "false"])
    new = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in new if out not in p.parents and p not in (out, out.parent, out.parent.parent)]
    assert outside == [] and not (tmp_path / "abs-escape.npz").exists()
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 * len(ids) and all(p.parent == out for p in written)  # six distinct ids, six stems
    assert len({Path(f).stem for f in files}) == len(ids)


# --- 4. image depths and bombs -------------------------------------------------------------------------------

RAMP = np.arange(256, dtype=np.uint16)  # the 8-bit values every conversion must give back


def _png_bytes(img: Image.Image) -> io.BytesIO:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    buf.seek(0)
    return buf


@pytest.mark.parametrize("kind", ["I;16", "I;16B", "I", "F", "uint16 array", "float array"])
def test_high_depth_images_scale_to_8_bit(kind):
    wide = np.tile(RAMP * 257, (3, 1))  # 0, 257, ..., 65535: 16-bit full range
    if kind == "I;16":
        img = Image.open(_png_bytes(Image.fromarray(wide)))  # a real 16-bit PNG
        assert img.mode == "I;16"
        got = to_rgb(img)
    elif kind == "I;16B":
        got = to_rgb(Image.frombytes("I;16B", (256, 3), wide.astype(">u2").tobytes()))
    elif kind == "I":
        got = to_rgb(Image.fromarray(wide.astype(np.int32)))
    elif kind == "F":
        got = to_rgb(Image.fromarray((wide / 65535.0).astype(np.float32)))
    elif kind == "uint16 array":
        got = array_to_rgb(np.stack([wide] * 3, axis=-1))
    else:
        got = array_to_rgb(RAMP[None, :].repeat(3, 0) / 255.0)
    arr = np.asarray(got)
    assert got.mode == "RGB" and arr.shape == (3, 256, 3)
    np.testing.assert_array_equal(arr[1, :, 0], RAMP)  # PIL's own convert("RGB") gives only 0 and 255 here
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])


def test_one_bit_image_is_black_and_white():
    bits = Image.fromarray(np.array([[0, 1, 1, 0]], dtype=bool))
    assert bits.mode == "1"
    np.testing.assert_array_equal(np.asarray(to_rgb(bits))[0, :, 1], [0, 255, 255, 0])


def _bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG header claiming width x height 1-bit pixels, with one tiny IDAT chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_and_counted(tmp_path, monkeypatch, caplog):
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 40), (255, 0, 0)).save(root / "cat" / "ok.png")
    Image.new("RGB", (80, 80), (0, 255, 0)).save(root / "cat" / "large.png")
    (root / "cat" / "bomb.png").write_bytes(_bomb_png(100_000, 100_000))  # 10^10 pixels in a 100-byte file
    monkeypatch.setattr(image_base, "MAX_PIXELS", 50 * 50)
    ds = ImageFolder(root, size=16)
    samples = list(ds.iter_samples())
    assert [s.id for s in samples] == ["cat/ok.png"]
    assert sorted(ds.skipped) == ["cat/bomb.png", "cat/large.png"]
    assert "decompression" in caplog.text and "2 unreadable image(s) skipped" in caplog.text


def test_hf_images_of_high_depth_and_bombs(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    wide = np.tile(RAMP * 257, (4, 1))
    images = [{"bytes": _png_bytes(Image.fromarray(wide)).getvalue(), "path": None},
              {"bytes": _bomb_png(60_000, 60_000), "path": None}]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict({"image": images, "label": [0, 1]}, features=feats).save_to_disk(str(tmp_path / "ds"))
    import revelio.datasets.folders as folders

    monkeypatch.setattr(folders, "resize_center_crop", lambda img, size: img)  # compare at full width
    ds = HFDiskDataset(tmp_path / "ds", size=4)
    samples = list(ds.iter_samples())
    assert len(samples) == 1 and ds.skipped == ["00000001"]
    np.testing.assert_array_equal(np.asarray(samples[0].image)[0, :, 0], RAMP)


# --- 5. counts and ranges, refused before any model loads ------------------------------------------------------

@pytest.mark.parametrize("args,key", [
    (["extract", "--data.count", "0"], "data.count"),
    (["extract", "--batch_size", "-4"], "batch_size"),
    (["extract", "--hooks", "[]"], "hooks"),
    (["extract", "--timesteps", "[]"], "timesteps"),
    (["extract", "--timesteps", "[25, 1000]"], "timesteps[1]"),
    (["sae", "fit", "--data.batch_size", "0", "--data.store", "x.h5", "--data.hook", "mid_block"], "data.batch_size"),
    (["sae", "fit", "--trainer.max_steps", "0"], "trainer.max_steps"),
    (["sae", "fit", "--model.k", "-1"], "model.k"),
    (["sae", "eval", "--batch_size", "0"], "batch_size"),
    (["probe", "--seeds", "[]"], "seeds"),
    (["probe", "--streaming.batch_size", "0"], "streaming.batch_size"),
    (["probe", "--test_fraction", "1.0"], "test_fraction"),
    (["saliency", "--data.count", "-1"], "data.count"),
    (["saliency", "--steps", "0"], "steps"),
    (["segment", "--seeds", "[]"], "seeds"),
    (["compare", "--images", "0"], "images"),
    (["steer", "--inference_steps", "0"], "inference_steps"),
    (["data", "--data.size", "0"], "data.size"),
    (["demo", "--images", "0"], "images"),
])
def test_out_of_range_values_name_the_key(args, key, capsys, monkeypatch):
    import revelio.zoo

    def no_model(*a, **k):  # the check must come first: loading a model here fails the test
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(revelio.zoo, "load_pipeline", no_model)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("revelio: error: ") == 1
    last = err.strip().splitlines()[-1]  # (an import-time library warning may come before it)
    assert last.startswith(f"revelio: error: {key}: ") and ("out of range" in last or "the list is empty" in last)


def test_zero_count_exits_2_from_the_console():
    res = cli("extract", "--data.count", "0", "--out", "/nonexistent/never.h5")
    assert one_line_error(res) == "revelio: error: data.count: 0 is out of range; it must be >= 1"


# --- 6. bad SAE folders and one-line errors -------------------------------------------------------------------

@pytest.fixture
def sae_dir(tmp_path):
    from sae.io import save
    from sae.model import SparseAutoencoder

    torch.manual_seed(0)
    return save(SparseAutoencoder(8, 32, 4), tmp_path / "sae", extra={"hook": "mid_block", "timestep": 25})


def _cfg(folder: Path) -> dict:
    return json.loads((folder / "cfg.json").read_text())


@pytest.mark.parametrize("damage,expected", [
    ("missing cfg", "cfg.json is missing"),
    ("bad json", "cfg.json is not valid JSON"),
    ("json list", "cfg.json must hold a JSON object"),
    ("d_in", "cfg.json says d_in=16 but the tensors in sae_weights.safetensors have d_in=8"),
    ("d_sae", "cfg.json says d_sae=64 but the tensors in sae_weights.safetensors have d_sae=32"),
    ("k", "cfg.json: k=99 must be an integer in [1, d_sae=32]"),
    ("truncated", "sae_weights.safetensors is not a readable safetensors file"),
    ("random", "sae_weights.safetensors is not a readable safetensors file"),
    ("missing weights", "needs cfg.json and sae_weights.safetensors"),
    ("wrong tensor", "b_dec has shape (5,), expected (8,)"),
])
def test_broken_sae_folder_is_one_line_naming_the_file(sae_dir, damage, expected, capsys):
    w, c = sae_dir / "sae_weights.safetensors", sae_dir / "cfg.json"
    if damage == "missing cfg":
        c.unlink()
    elif damage == "bad json":
        c.write_text(c.read_text()[:-20])
    elif damage == "json list":
        c.write_text("[1, 2]")
    elif damage in ("d_in", "d_sae", "k"):
        c.write_text(json.dumps({**_cfg(sae_dir), damage: {"d_in": 16, "d_sae": 64, "k": 99}[damage]}))
    elif damage == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "random":
        w.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "missing weights":
        w.unlink()
    else:
        from safetensors.torch import load_file, save_file
        t = load_file(str(w))
        save_file({**t, "b_dec": torch.zeros(5)}, str(w))
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        sae.load(sae_dir)
    assert str(sae_dir) in str(e.value) and expected in str(e.value)
    assert main(["sae", "eval", "--sae", str(sae_dir), "--store", "unused.h5"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and err.count("revelio: error: ") == 1 and expected in last and str(sae_dir) in last


def test_unwritable_output_folder_is_one_line(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should go")
    line = one_line_error(cli("data", "--data.count", "2", "--out", str(blocker / "sub" / "grid.png")))
    assert line.startswith("revelio: error: not a directory: ") and str(blocker) in line
    if os.geteuid() == 0:
        return  # root writes into read-only folders
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = one_line_error(cli("data", "--data.count", "2", "--out", str(ro / "sub" / "grid.png")))
    finally:
        ro.chmod(0o700)
    assert "permission denied" in line and str(ro / "sub") in line


def test_failed_allowed_download_is_one_line(tmp_path):
    env = {**ENV, "REVELIO_ALLOW_NETWORK": "1", "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    res = subprocess.run([sys.executable, "-m", "revelio", "extract", "--model.id", "nobody/no-such-model",
                          "--data.count", "2", "--out", str(tmp_path / "a.h5")], capture_output=True, text=True,
                         env=env, timeout=300, cwd=ROOT)
    assert "nobody/no-such-model" in one_line_error(res) or "127.0.0.1" in one_line_error(res)


def test_bugs_keep_their_traceback(monkeypatch):
    import revelio.cli as cli_mod

    cli_mod._load_commands()

    def buggy():
        raise TypeError("a real bug")

    monkeypatch.setitem(cli_mod.COMMANDS, "buggy", cli_mod.Command("buggy", "a bug", buggy))
    with pytest.raises(TypeError, match="a real bug"):
        main(["buggy"])


# --- 7. resume keeps the CSV history and the wandb run ------------------------------------------------------------

FIT = ["--data.hook", "mid_block", "--data.timestep", "25", "--data.samples", "pooled", "--data.batch_size", "4",
       "--data.chunk_images", "4", "--data.buffer_chunks", "2", "--model.expansion", "2", "--model.k", "4",
       "--model.lr", "3e-3", "--model.warmup_steps", "4", "--model.hist_every", "0", "--model.dead_after", "40",
       "--model.init_samples", "256", "--model.b_dec_init", "mean", "--trainer.log_every_n_steps", "1",
       "--trainer.enable_progress_bar", "false", "--logging.checkpoint_every_n_steps", "5", "--logging.wandb_mode",
       "offline"]


def _steps(path: Path) -> list[tuple[int, str]]:
    """(step, kind) of every CSV row: kind 'train' or 'val'."""
    rows = list(csv.DictReader(open(path)))
    return [(int(r["step"]), "train" if r.get("train/fvu") else "val") for r in rows]


@pytest.mark.slow
def test_killed_fit_resumes_its_csv_and_wandb_run(sd_store, tmp_path):
    steps = 80
    run(["sae", "fit", "--data.store", str(sd_store), "--out", str(tmp_path / "a"), "--trainer.max_steps", str(steps),
         *FIT])
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "revelio", "sae", "fit", "--data.store", str(sd_store), "--out",
                             str(out), "--trainer.max_steps", str(steps), *FIT], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts / "step00000015.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # a real kill, somewhere after step 15
    proc.wait()
    killed_at = max(s for s, _ in _steps(out / "csv" / "metrics.csv"))
    assert not (out / "sae").exists() and killed_at >= 10
    run(["sae", "fit", "--data.store", str(sd_store), "--out", str(out), "--trainer.max_steps", str(steps),
         "--ckpt_path", str(ckpts / "step00000010.ckpt"), *FIT])
    got, want = _steps(out / "csv" / "metrics.csv"), _steps(tmp_path / "a" / "csv" / "metrics.csv")
    assert got == want and len(set(got)) == len(got)  # every step once, in order, as in the uninterrupted run
    first = list(csv.DictReader(open(tmp_path / "a" / "csv" / "metrics.csv")))
    again = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    assert [r["train/fvu"] for r in again[:10]] == [r["train/fvu"] for r in first[:10]]  # history before: kept
    runs = sorted((out / "wandb").glob("offline-run-*"))
    run_id = _cfg(out / "sae")["wandb_run_id"]
    assert len(runs) == 2 and all(re.match(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?$", p.name) for p in runs)  # resumed
    assert all(list(p.glob(f"run-{run_id}.wandb")) for p in runs)


def test_resume_after_a_stop_keeps_rows_once(sd_store, tmp_path):
    out = tmp_path / "r"
    run(["sae", "fit", "--data.store", str(sd_store), "--out", str(out), "--trainer.max_steps", "12", *FIT])
    before = _steps(out / "csv" / "metrics.csv")
    assert max(s for s, _ in before) == 11
    run(["sae", "fit", "--data.store", str(sd_store), "--out", str(out), "--trainer.max_steps", "20",
         "--ckpt_path", str(out / "checkpoints" / "step00000010.ckpt"), *FIT])
    after = _steps(out / "csv" / "metrics.csv")
    assert [s for s, k in after if k == "train"] == list(range(20))  # 10 and 11 were logged twice, kept once
    assert after[:len([x for x in before if x[0] < 10])] == [x for x in before if x[0] < 10]
    # offline-run-<date>_<time>-<id>; wandb adds "-1", "-2" when both runs start within the same second
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([0-9a-z]+)", p.name).group(1) for p in (out / "wandb").glob("offline-run-*")}
    assert ids == {_cfg(out / "sae")["wandb_run_id"]}


# --- 8. non-finite held-out metrics name the images ----------------------------------------------------------------

def _nan_copy(store: Path, path: Path, rows: list[int]) -> list[str]:
    """Copy ``store`` to ``path`` with NaN / inf in the mid_block t=25 maps of ``rows``; their image ids."""
    shutil.copy(store, path)
    with h5py.File(path, "r+") as f:
        for r in rows:
            f["acts/mid_block/t25"][r, r % 4, 1, 1] = np.nan if r % 2 else np.inf
        return [v.decode() if isinstance(v, bytes) else str(v) for v in f["images/id"][rows]]


@pytest.fixture
def nan_store(sd_store, tmp_path):
    """A copy of the sd store with NaN / inf in images 3 and 10; (path, their ids)."""
    bad = tmp_path / "bad.h5"
    return bad, _nan_copy(sd_store, bad, [3, 10])


def test_nonfinite_held_out_metrics_name_the_images(sd_store, tmp_path, capsys):
    from sae.data import StoreDataModule
    from sae.io import save
    from sae.model import SparseAutoencoder

    dm = StoreDataModule(str(sd_store), "mid_block", 25, val_fraction=0.25)
    dm.setup()
    val = [int(r) for r in dm.val_rows[:2]]
    bad = tmp_path / "bad.h5"
    ids = _nan_copy(sd_store, bad, val)  # NaN only in held-out images: training stays finite
    args = ["sae", "fit", "--data.store", str(bad), "--out", str(tmp_path / "f"), "--trainer.max_steps", "3",
            "--data.check_finite", "false", "--data.val_fraction", "0.25", *FIT]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("revelio: error: held-out metrics") and "fvu" in err and "not finite" in err
    assert all(i in err for i in ids), err
    assert not (tmp_path / "f" / "sae").exists() and (tmp_path / "f" / "checkpoints" / "last.ckpt").exists()
    # sae eval of a finite SAE on the NaN images: the error names them
    folder = save(SparseAutoencoder(64, 128, 4), tmp_path / "sae",
                  extra={"hook": "mid_block", "timestep": 25, "source_store": str(bad), "split":
                         {"val_fraction": 0.25, "seed": 0}})
    assert main(["sae", "eval", "--sae", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert all(i in err for i in ids), err


def test_check_metrics_names_images_or_the_model(nan_store):
    from sae.data import StoreDataModule
    from sae.train import check_metrics

    bad, ids = nan_store
    dm = StoreDataModule(str(bad), "mid_block", 25, check_finite=False)
    dm.setup()
    rows = np.array([1, 3, 10, 12])
    with pytest.raises(FloatingPointError, match=f"fvu.*2 image.*{ids[0]}, {ids[1]}"):
        check_metrics({"fvu": float("nan"), "l0": 4.0}, dm, rows, "test")
    with pytest.raises(FloatingPointError, match="activations are finite"):
        check_metrics({"fvu": float("inf")}, dm, np.array([1, 2]), "test")
    check_metrics({"fvu": 0.5, "l0": 4.0}, dm, rows, "test")  # finite: no error


def test_probe_on_nan_activations_names_the_images(nan_store, tmp_path, capsys):
    bad, ids = nan_store
    for backend in ("sklearn", "torch"):
        assert main(["probe", "--store", str(bad), "--hooks", "[mid_block]", "--timesteps", "[25]", "--seeds", "[0]",
                     "--backend", backend, "--baselines.pixels", "false", "--baselines.random", "false",
                     "--streaming.epochs", "1", "--out", str(tmp_path / backend), "--progress", "false"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "NaN/inf activations at mid_block t=25" in err, err
        named = err.split(": ")[-1].split(";")[0].split(", ")  # the images of the first batch read that has them
        assert named and set(named) <= set(ids), err
