"""SAE training from an activation store: data module, CLI + YAML, logging, exact resume, DDP, bad input."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import sae
from revelio.cli import run
from sae.data import StoreDataModule
from sae.lightning import SAEModule
from sae.train import evaluate_sae, fit

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "configs" / "sae" / "tiny-sd.yaml"
SMALL = ["--trainer.enable_progress_bar", "false", "--model.init_samples", "1024", "--data.chunk_images", "4",
         "--data.buffer_chunks", "2"]


def batches(dm, rows, start=0, epoch=0, workers=0):
    dm.num_workers = workers
    loader = dm.loader(rows, shuffle=True)
    dm.resume_at(epoch, start)
    dm._epoch_counter = epoch - 1
    return [(x.numpy().copy(), r.numpy().copy()) for x, r in loader]


def test_stream_splits_by_image_shuffles_and_resumes(sd_store, monkeypatch):
    reads = []
    real_block = sae.data._Source.block
    monkeypatch.setattr(sae.data._Source, "block", lambda self, rows, out=None: reads.append(len(rows)) or real_block(self, rows, out))
    dm = StoreDataModule(str(sd_store), "up_blocks.1", 25, samples="tokens", batch_size=100, val_fraction=0.2,
                         chunk_images=2, buffer_chunks=3, seed=0, token_cache=False)  # the shuffle-buffer stream
    dm.setup()
    assert dm.d_in == 64 and dm.per_image == 256
    assert len(np.intersect1d(dm.train_rows, dm.val_rows)) == 0 and len(dm.val_rows) == 5
    full = batches(dm, dm.train_rows)
    rows = np.concatenate([r for _, r in full])
    assert set(rows) <= set(dm.train_rows)
    per_image = np.bincount(rows, minlength=24)
    assert per_image.max() <= 256  # no sample twice in an epoch
    assert len(full) == len(dm.train_rows) * 256 // 100
    assert len(set(rows[:100])) > 3  # the buffer mixes images within a batch
    assert max(reads) <= 2 * 3  # memory: never more than one buffer (chunk_images x buffer_chunks images) read at once
    # every sample is the store's token: row r, some position
    with sae.data.open_store(sd_store) as st:
        tok, tok_rows = st.tokens("up_blocks.1", 25, [int(rows[0])])
    assert np.any(np.all(np.isclose(tok, full[0][0][0]), axis=1))
    # a resumed pass yields exactly the tail, without reading what it skips
    tail = batches(dm, dm.train_rows, start=7)
    assert len(tail) == len(full) - 7
    for (a, ra), (b, rb) in zip(full[7:], tail):
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(a, b)
    other = batches(dm, dm.train_rows, epoch=1)
    assert not np.array_equal(np.concatenate([r for _, r in other]), rows)
    # two workers: a fixed round-robin, so resuming is exact there too
    two = batches(dm, dm.train_rows, workers=2)
    two_tail = batches(dm, dm.train_rows, start=5, workers=2)
    for (a, ra), (b, rb) in zip(two[5:], two_tail):
        np.testing.assert_array_equal(ra, rb)
    assert len(two_tail) == len(two) - 5


def test_dit_tokens_batchtopk_matryoshka(flux_store, tmp_path, one_torch_thread):
    """DiT image tokens as samples; the BatchTopK + Matryoshka options through the Lightning run."""
    dm = StoreDataModule(str(flux_store), "transformer_blocks.3", 250, samples="tokens", batch_size=64)
    dm.setup()
    with sae.data.open_store(flux_store) as st:
        assert dm.per_image == st.read("transformer_blocks.3", 250, [0]).shape[1]
        assert dm.d_in == st.d_in("transformer_blocks.3", 250)
    folder = sae.fit_from_store(flux_store, "transformer_blocks.3", 250, tmp_path / "f", expansion=4, k=4,
                                samples="tokens", batch_size=64, max_steps=8, architecture="batchtopk",
                                matryoshka=[dm.d_in])
    m = sae.load(folder)
    assert m.architecture == "batchtopk" and m.threshold > 0 and m.prefixes == [dm.d_in, 4 * dm.d_in]
    from sae_lens import SAE  # SAELens reads the BatchTopK folder as a jumprelu SAE with the learned threshold

    theirs = SAE.load_from_disk(str(folder))
    with sae.data.open_store(flux_store) as st:
        x = torch.as_tensor(np.asarray(st.tokens("transformer_blocks.3", 250, np.arange(2))[0], dtype=np.float32))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), m.encode(x), atol=1e-4, rtol=1e-4)
    metrics = json.loads((tmp_path / "f" / "metrics.json").read_text())["val"]
    assert 0 < metrics["l0"] < 3 * 4 and metrics["fvu"] < 1.5


def test_missing_hook_or_timestep_lists_what_the_store_has(sd_store):
    with pytest.raises(KeyError, match=r"mid_block: \[25, 250\]; up_blocks.1: \[25, 250\]"):
        StoreDataModule(str(sd_store), "down_blocks.0", 25).setup()
    with pytest.raises(KeyError, match=r"timesteps \[25, 250\]"):
        StoreDataModule(str(sd_store), "mid_block", 999).setup()
    with pytest.raises(ValueError, match="pooled.*tokens"):
        StoreDataModule(str(sd_store), "mid_block", 25, samples="patches")
    with pytest.raises(FileNotFoundError):
        StoreDataModule(str(sd_store) + ".missing", "mid_block", 25).setup()


def test_nonfinite_activations_reported_with_image_ids(sd_store, tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copy(sd_store, bad)
    with h5py.File(bad, "r+") as f:
        f["acts/mid_block/t25"][3, 0, 1, 1] = np.nan
        f["acts/mid_block/t25"][10, 2, 0, 0] = np.inf
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in f["images/id"][[3, 10]]]
    with pytest.raises(ValueError, match=f"2 image.*{ids[0]}.*{ids[1]}.*nonfinite skip"):
        StoreDataModule(str(bad), "mid_block", 25).setup()
    dm = StoreDataModule(str(bad), "mid_block", 25, nonfinite="skip")
    dm.setup()
    assert 3 not in dm.train_rows and 10 not in dm.val_rows and len(dm.train_rows) + len(dm.val_rows) == 22
    assert dm.skipped_ids == ids


def test_fit_cli_passes_any_trainer_argument(sd_store, tmp_path, one_torch_thread):
    """A Trainer argument beyond the common ones reaches lightning.Trainer: epochs limited by batches, not max_steps."""
    res = run(["sae", "fit", "--config", str(YAML), "--data.store", str(sd_store), "--out", str(tmp_path / "run"),
               "--trainer.max_steps", "-1", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
               "--trainer.accumulate_grad_batches", "1", "--data.batch_size", "64", "--logging.wandb_mode", "disabled",
               "--logging.csv", "false", *SMALL])
    assert res["steps"] == 6 and res["samples_seen"] == 6 * 64


def test_fit_cli_yaml_logs_checkpoints_and_eval(sd_store, tmp_path, capsys, one_torch_thread):
    out = tmp_path / "run"
    res = run(["sae", "fit", "--config", str(YAML), "--data.store", str(sd_store), "--out", str(out),
               "--trainer.max_steps", "12", "--trainer.log_every_n_steps", "3", "--model.hist_every", "6",
               "--data.batch_size", "256", "--logging.checkpoint_every_n_steps", "6", *SMALL])
    assert res["steps"] == 12 and res["samples_seen"] == 12 * 256
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    logged = [r for r in rows if r.get("train/fvu")]
    assert len(logged) == 4
    for key in ("train/fvu", "train/explained_variance", "train/l0", "train/dead_fraction", "train/auxk", "train/lr",
                "train/samples_seen"):
        assert logged[-1][key] != ""
    assert float(logged[-1]["train/l0"]) == 8.0 and float(logged[-1]["train/fvu"]) < float(logged[0]["train/fvu"])
    assert sorted(p.name for p in (out / "histograms").glob("*.png")) == ["step_00000006.png", "step_00000012.png"]
    # the histograms went through WandbLogger at steps 6 and 12 (an error there fails the run); offline run on disk
    assert len(list((out / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    import wandb
    assert wandb.run is None  # closed: a second fit in this process gets its own run, not this one
    assert {p.name for p in (out / "checkpoints").glob("*.ckpt")} >= {"step00000006.ckpt", "step00000012.ckpt", "last.ckpt"}
    m = sae.load(out / "sae")
    assert (m.d_in, m.d_sae, m.k, m.cfg["hook"], m.cfg["timestep"]) == (64, 256, 8, "up_blocks.1", 25)
    # the folder `sae fit` wrote is a SAELens 6 folder: same codes and reconstruction on the store's activations
    from sae_lens import SAE

    theirs = SAE.load_from_disk(str(out / "sae"))
    assert theirs.cfg.metadata.hook_name == "up_blocks.1" and theirs.cfg.metadata.timestep == 25
    with sae.data.open_store(sd_store) as st:
        x = torch.as_tensor(np.asarray(st.pooled("up_blocks.1", 25, np.arange(8)), dtype=np.float32))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), m.encode(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(theirs(x), m(x)[0], atol=1e-4, rtol=1e-4)
    capsys.readouterr()
    ev = run(["sae", "eval", "--sae", str(out / "sae")])
    assert ev["l0"] == 8.0 and 0 < ev["fvu"] < 1 and ev["n_images"] == 2
    assert ev["fvu"] == pytest.approx(json.loads((out / "metrics.json").read_text())["val"]["fvu"], rel=1e-6)
    assert "FVU" in capsys.readouterr().out and (out / "sae" / "eval_val.png").exists()
    with pytest.raises(Exception, match="unknown key.*'model.kk'"):
        run(["sae", "fit", "--config", str(YAML), "--model.kk", "3"])


@pytest.mark.parametrize("samples", ["pooled", "tokens"])
def test_resume_is_exact(sd_store, tmp_path, one_torch_thread, samples):
    """12 steps straight == 6 steps, checkpoint, resume for 6 more (crossing an epoch end mid-way); tokens
    read the pre-shuffled token cache (mid_block: 22 training images x 4 x 4 positions, 6 batches of 58), so
    their step-6 checkpoint falls on the last batch of epoch 0 (Lightning then counts an extra epoch)."""
    data = ({"samples": "pooled", "batch_size": 4, "chunk_images": 4, "buffer_chunks": 2} if samples == "pooled"
            else {"samples": "tokens", "batch_size": 58})
    kw = dict(model={"expansion": 2, "k": 4, "lr": 3e-3, "warmup_steps": 4, "hist_every": 0, "dead_after": 40,
                     "init_samples": 256, "b_dec_init": "mean"},
              data=data,
              checkpoint_every_n_steps=6, wandb_mode="disabled", csv=False)
    tr = {"enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1}
    fit(sd_store, "mid_block", 25, tmp_path / "a", trainer={"max_steps": 12, **tr}, **kw)
    fit(sd_store, "mid_block", 25, tmp_path / "b", trainer={"max_steps": 12, **tr},
        ckpt_path=str(tmp_path / "a" / "checkpoints" / "step00000006.ckpt"), **kw)
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 12
    assert a["StoreDataModule"] == b["StoreDataModule"] == (
        {"epoch": 2, "batches": 2} if samples == "pooled" else {"epoch": 1, "batches": 6})  # 5 / 6 batches an epoch
    for key, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], v, atol=1e-6, rtol=1e-5, msg=key)
    assert int(a["state_dict"]["sae.since_fired"].max()) > 0
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        torch.testing.assert_close(opt_b[i]["exp_avg_sq"], opt_a[i]["exp_avg_sq"], atol=1e-9, rtol=1e-5)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_d_in_mismatch_on_resume_fails_clearly(sd_store, tmp_path, one_torch_thread):
    sae_dir = sae.fit_from_store(sd_store, "mid_block", 25, tmp_path / "f", expansion=2, k=4, batch_size=8, max_steps=3)
    assert sae.load(sae_dir).d_in == 64
    ckpt = torch.load(tmp_path / "f" / "checkpoints" / "last.ckpt", weights_only=False)
    with pytest.raises(ValueError, match="d_in mismatch: the checkpoint was trained on d_in=64, this run has d_in=32"):
        SAEModule(d_in=32, expansion=2, k=4).on_load_checkpoint(ckpt)


def _final_val_fvu(out: Path) -> float:
    return json.loads((out / "metrics.json").read_text())["val"]["fvu"]


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process(sd_store, tmp_path):
    """The same config on 2 gloo processes (half the batch each) ends at the single-process held-out FVU."""
    common = ["sae", "fit", "--config", str(YAML), "--data.store", str(sd_store), "--trainer.max_steps", "20",
              "--trainer.accelerator", "cpu", "--logging.wandb_mode", "disabled", "--logging.csv", "false",
              "--model.hist_every", "10", *SMALL]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(Path(sys.executable).parent / "revelio"), *common, "--out", str(ddp), "--data.batch_size", "256",
                    "--trainer.devices", "2", "--trainer.strategy", "ddp"], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=300)
    torch.set_num_threads(1)
    res = run([*common, "--out", str(single), "--data.batch_size", "512"])
    torch.set_num_threads(2)
    d = json.loads((ddp / "metrics.json").read_text())
    assert d["samples_seen"] == res["samples_seen"] == 20 * 512
    assert abs(d["val"]["fvu"] - res["val"]["fvu"]) < 0.03
    assert d["val"]["l0"] == res["val"]["l0"] == 8.0
    assert d["val"]["fvu"] < 0.9


@pytest.fixture(scope="module")
def sd_store_128(tmp_path_factory):
    """tiny-sd up_blocks.1 at t=25 of 128 shapes images (enough held-out images for a stable L0)."""
    from revelio.commands.extract import ExtractConfig, extract_cmd
    from revelio.config import load

    out = tmp_path_factory.mktemp("store128") / "sd128.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract_cmd(load(ExtractConfig, overrides={
            "model": {"id": "tiny-sd"}, "data": {"name": "shapes", "size": 64, "count": 128, "seed": 0},
            "hooks": ["up_blocks.1"], "timesteps": [25], "storage_dtype": "float32", "batch_size": 32,
            "out": str(out), "progress": False}))
    finally:
        torch.set_num_threads(threads)
    return out


def test_batchtopk_threshold_is_calibrated_at_checkpoints_and_end(sd_store_128, tmp_path, one_torch_thread):
    """A short BatchTopK run: the saved threshold gives held-out L0 within 5% of k (the running mean alone lags)."""
    sd_store = sd_store_128
    res = fit(sd_store, "up_blocks.1", 25, tmp_path / "b",
              model={"expansion": 4, "k": 4, "architecture": "batchtopk", "warmup_steps": 5, "hist_every": 0,
                     "dead_after": 20000, "init_samples": 8192},
              data={"samples": "tokens", "batch_size": 256},
              trainer={"max_steps": 30, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                       "enable_model_summary": False, "val_check_interval": 15},
              checkpoint_every_n_steps=15, wandb_mode="disabled", csv=False)
    assert abs(res["val"]["l0"] - 4) <= 0.05 * 4
    assert abs(evaluate_sae(res["sae"], split="val")["l0"] - 4) <= 0.05 * 4
    mid = torch.load(tmp_path / "b" / "checkpoints" / "step00000015.ckpt", weights_only=False)
    module = SAEModule(d_in=64, expansion=4, k=4, architecture="batchtopk")
    module.load_state_dict(mid["state_dict"])
    dm = StoreDataModule(str(sd_store), "up_blocks.1", 25, samples="tokens")
    dm.setup()
    x = module._calibration_sample(dm, 8192)
    module.sae.eval()
    l0_saved = float((module.sae.encode(x) != 0).sum(1).float().mean())
    assert abs(l0_saved - 4) <= 0.01 * 4  # the checkpoint of step 15 holds the threshold calibrated then


# ---- SAEs over several timesteps (issue 19) --------------------------------------------------------------------


def test_timestep_aware_resume_is_exact(sd_store, tmp_path, one_torch_thread):
    """Timestep-aware SAE over t = 25, 250: 12 steps straight == 6 steps, checkpoint, resume for 6 more,
    including the per-timestep scale and bias (which training moved off the identity) and their Adam state."""
    kw = dict(model={"expansion": 2, "k": 4, "lr": 3e-3, "warmup_steps": 4, "hist_every": 0, "dead_after": 40,
                     "init_samples": 256, "b_dec_init": "mean", "timestep_conditioning": "scale_bias"},
              data={"samples": "pooled", "batch_size": 8, "chunk_images": 4, "buffer_chunks": 2},
              checkpoint_every_n_steps=6, wandb_mode="disabled", csv=False)
    tr = {"enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1}
    fit(sd_store, "mid_block", [25, 250], tmp_path / "a", trainer={"max_steps": 12, **tr}, **kw)
    fit(sd_store, "mid_block", [25, 250], tmp_path / "b", trainer={"max_steps": 12, **tr},
        ckpt_path=str(tmp_path / "a" / "checkpoints" / "step00000006.ckpt"), **kw)
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 12
    assert a["StoreDataModule"] == b["StoreDataModule"] == {"epoch": 2, "batches": 2}  # 2 x 19 images / 8: 5 per epoch
    assert a["state_dict"]["sae.t_scale"].shape == (2, 128)
    assert float((a["state_dict"]["sae.t_scale"] - 1).abs().max()) > 1e-3
    for key, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], v, atol=1e-6, rtol=1e-5, msg=key)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        torch.testing.assert_close(opt_b[i]["exp_avg_sq"], opt_a[i]["exp_avg_sq"], atol=1e-9, rtol=1e-5)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    with pytest.raises(ValueError, match=r"timesteps mismatch: the checkpoint was trained with timesteps=\[25, 250\]"):
        SAEModule(d_in=64, expansion=2, k=4, timesteps=[25], timestep_conditioning="scale_bias").on_load_checkpoint(a)


def test_fit_cli_several_timesteps_records_them(sd_store, tmp_path, capsys, one_torch_thread):
    """`sae fit --data.timesteps [25, 250]`: the SAE folder records the timesteps, the held-out metrics come
    per timestep (and agree with `sae eval` and with the loaded SAE encoding at each t); plain
    ``data.timestep`` still trains a one-timestep SAE; scale_bias with one timestep fails clearly."""
    common = ["sae", "fit", "--config", str(YAML), "--data.store", str(sd_store), "--trainer.max_steps", "6",
              "--logging.wandb_mode", "disabled", "--logging.csv", "false", "--data.batch_size", "256",
              "--model.hist_every", "0", *SMALL]
    res = run([*common, "--out", str(tmp_path / "ts"), "--data.timesteps", "[25, 250]",
               "--model.timestep_conditioning", "scale_bias"])
    cfg = json.loads((tmp_path / "ts" / "sae" / "cfg.json").read_text())
    assert cfg["timesteps"] == [25, 250] and cfg["timestep"] == 25 and cfg["timestep_conditioning"] == "scale_bias"
    per = res["val"]["per_timestep"]
    assert sorted(per) == [25, 250] and all(0 < v["fvu"] < 1.5 and v["l0"] == 8.0 for v in per.values())
    assert per[25]["n_samples"] == per[250]["n_samples"] == res["val"]["n_samples"] // 2
    capsys.readouterr()
    ev = run(["sae", "eval", "--sae", str(tmp_path / "ts" / "sae"), "--split", "val"])
    for t in (25, 250):
        assert ev["per_timestep"][t]["fvu"] == pytest.approx(per[t]["fvu"], rel=1e-6)
    printed = capsys.readouterr().out
    assert "t=25: FVU" in printed and "t=250: FVU" in printed
    saved = json.loads((tmp_path / "ts" / "sae" / "eval_val.json").read_text())
    assert saved["timesteps"] == [25, 250] and sorted(saved["per_timestep"]) == ["25", "250"]
    model = sae.load(tmp_path / "ts" / "sae")
    dm = StoreDataModule(str(sd_store), "up_blocks.1", 250, samples="tokens", batch_size=4096)
    dm.setup()
    x = torch.cat([b[0] for b in dm.val_dataloader()]).float()
    x_hat, _ = model(x, timestep=250)
    assert sae.fvu(x * model.norm_scale, x_hat * model.norm_scale).item() == pytest.approx(per[250]["fvu"], rel=1e-4)
    one = run([*common, "--out", str(tmp_path / "one"), "--data.timestep", "250"])
    assert "per_timestep" not in one["val"]
    assert "timesteps" not in json.loads((tmp_path / "one" / "sae" / "cfg.json").read_text())
    with pytest.raises(ValueError, match="timestep_conditioning 'scale_bias' needs several timesteps"):
        run([*common, "--out", str(tmp_path / "bad"), "--model.timestep_conditioning", "scale_bias"])


@pytest.mark.slow
def test_ddp_timestep_aware_two_cpu_processes_match_single_process(sd_store, tmp_path):
    """A timestep-aware SAE over t = 25, 250 on 2 gloo processes ends near the single-process held-out FVU at
    both timesteps, with the same samples seen."""
    common = ["sae", "fit", "--config", str(YAML), "--data.store", str(sd_store), "--trainer.max_steps", "20",
              "--trainer.accelerator", "cpu", "--logging.wandb_mode", "disabled", "--logging.csv", "false",
              "--model.hist_every", "10", "--data.timesteps", "[25, 250]", "--model.timestep_conditioning",
              "scale_bias", *SMALL]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(Path(sys.executable).parent / "revelio"), *common, "--out", str(ddp),
                    "--data.batch_size", "256", "--trainer.devices", "2", "--trainer.strategy", "ddp"], check=True,
                   env=env, cwd=tmp_path, capture_output=True, timeout=300)
    torch.set_num_threads(1)
    res = run([*common, "--out", str(single), "--data.batch_size", "512"])
    torch.set_num_threads(2)
    d = json.loads((ddp / "metrics.json").read_text())
    assert d["samples_seen"] == res["samples_seen"] == 20 * 512
    for t in ("25", "250"):
        assert abs(d["val"]["per_timestep"][t]["fvu"] - res["val"]["per_timestep"][int(t)]["fvu"]) < 0.03
        assert d["val"]["per_timestep"][t]["fvu"] < 0.95
    assert json.loads((ddp / "sae" / "cfg.json").read_text())["timesteps"] == [25, 250]
