"""The trained zoo: shipped weights load and generate deterministically; training is seeded; the benchmark runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from revelio.zoo import load_pipeline, shipped_path
from revelio.zoo.quality import generate
from revelio.zoo.train import TRAIN_CONFIG_FILE, StageConfig, ZooTrainConfig, check_config, train_zoo

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, cls, shifted", [("tiny-sd", "StableDiffusionPipeline", False),
                                                ("tiny-flux", "FluxPipeline", True)])
def test_shipped_weights_load_trained(name, cls, shifted):
    folder = shipped_path(name)
    assert folder is not None, f"no trained weights shipped for {name}"
    pipe = load_pipeline(name)
    assert type(pipe).__name__ == cls
    assert next(pipe.vae.parameters()).dtype == torch.float32  # float16 storage, float32 compute
    # the VAE was trained and its latents normalised: scaling from the latent std, Flux also shifted
    assert pipe.vae.config.scaling_factor != 1.0
    assert (pipe.vae.config.shift_factor != 0.0) == shifted
    cfg = json.loads((folder / TRAIN_CONFIG_FILE).read_text())
    assert cfg["holdout"] and cfg["seed"] == 0
    random = load_pipeline(name, random_init=True)
    trained_w = next(pipe.vae.parameters())
    assert not torch.allclose(trained_w, next(random.vae.parameters()))


def test_generation_is_deterministic_for_a_seed():
    pipe = load_pipeline("tiny-sd")
    a, b, c = (generate(pipe, ["a red square"], [s], steps=2, guidance=4.0)[0] for s in (7, 7, 8))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_flux_generation_is_deterministic_for_a_seed():
    pipe = load_pipeline("tiny-flux")
    a, b = (generate(pipe, ["a blue circle"], [3], steps=2, guidance=4.0)[0] for _ in range(2))
    assert np.array_equal(a, b)


@pytest.mark.slow  # the benchmark trains its judge on rendered shapes images
def test_quality_benchmark_runs_on_a_few_prompts(tmp_path):
    spec = importlib.util.spec_from_file_location("zoo_quality", ROOT / "benchmarks" / "zoo_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "q.json"
    report = bench.main(["--models", "tiny-sd", "--pairs", "heldout", "--limit", "1", "--seeds", "1", "--steps", "2",
                         "--judge-images", "40", "--ceiling-images", "8", "--grid", str(tmp_path / "g.png"), "--json", str(out)])
    s = report["tiny-sd/heldout"]
    assert s["n"] == 1 and 0.0 <= s["colour"] <= 1.0 and 0.0 <= s["shape"] <= 1.0
    assert report["judge"]["colour"] > 0.9  # the judge itself sees real images right
    assert json.loads(out.read_text())["tiny-sd/heldout"]["n"] == 1
    assert (tmp_path / "g.png").stat().st_size > 0


def test_bad_config_names_the_choices():
    with pytest.raises(ValueError, match="vae, tiny-sd, tiny-flux, all"):
        check_config(ZooTrainConfig(model="tiny-xl"))
    with pytest.raises(ValueError, match="colours: red"):
        check_config(ZooTrainConfig(holdout=["pink circle"]))


def _tiny_cfg(tmp_path: Path, model: str) -> ZooTrainConfig:
    small = StageConfig(steps=1, batch_size=4, lr=1e-3, ema_decay=0.5)
    return ZooTrainConfig(model=model, out=str(tmp_path / "out"), workdir=str(tmp_path / "work"), images=8,
                          vae=small, sd=small, flux=small, threads=0, vae_crop=16)


@pytest.mark.slow  # trains the VAE twice and tiny-flux once (a step each, plus image rendering and saving)
def test_training_is_seeded_and_saves_loadable_pipelines(tmp_path):
    from diffusers import AutoencoderKL

    first_vae = AutoencoderKL.from_pretrained(train_zoo(_tiny_cfg(tmp_path, "vae"))["vae"]).state_dict()
    flux_dir = train_zoo(_tiny_cfg(tmp_path, "tiny-flux"))["tiny-flux"]
    pipe = load_pipeline(str(flux_dir))
    assert pipe.vae.config.scaling_factor > 0 and pipe.vae.config.shift_factor != 0
    assert json.loads((flux_dir / TRAIN_CONFIG_FILE).read_text())["images"] == 8
    again = train_zoo(_tiny_cfg(tmp_path, "vae"))["vae"]
    for k, v in AutoencoderKL.from_pretrained(again).state_dict().items():
        assert torch.equal(v, first_vae[k]), k


def test_zoo_train_command_is_registered(capsys):
    from revelio.cli import run

    run(["zoo", "train", "--help"])
    out = capsys.readouterr().out
    assert "--sd.steps" in out and "--flux.batch_size" in out and "--holdout" in out
