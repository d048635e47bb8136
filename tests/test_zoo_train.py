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
from revelio.zoo.train import (TRAIN_CONFIG_FILE, VAE_SHA_KEY, StageConfig, ZooTrainConfig, check_config, train_zoo,
                               vae_fingerprint)

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
                         "--judge-images", "40", "--ceiling-images", "8", "--two", "2", "--grid", str(tmp_path / "g.png"), "--json", str(out)])
    s = report["tiny-sd/heldout"]
    assert s["n"] == 1 and 0.0 <= s["colour"] <= 1.0 and 0.0 <= s["shape"] <= 1.0
    assert report["judge"]["colour"] > 0.9  # the judge itself sees real images right
    assert json.loads(out.read_text())["tiny-sd/heldout"]["n"] == 1
    two = report["tiny-sd/two"]
    assert two["n"] == 2 and 0.0 <= two["bound"] <= two["colours"] <= 1.0
    assert set(s["confusion"]) <= {"circle", "square", "triangle", "diamond", "cross", "star"}
    assert (tmp_path / "g.png").stat().st_size > 0


def test_bad_config_names_the_choices():
    with pytest.raises(ValueError, match="vae, tiny-sd, tiny-flux, tiny-sd3, all"):
        check_config(ZooTrainConfig(model="tiny-xl"))
    with pytest.raises(ValueError, match="colours: red"):
        check_config(ZooTrainConfig(holdout=["pink circle"]))


def _tiny_cfg(tmp_path: Path, model: str) -> ZooTrainConfig:
    small = StageConfig(steps=1, batch_size=4, lr=1e-3, ema_decay=0.5)
    return ZooTrainConfig(model=model, out=str(tmp_path / "out"), workdir=str(tmp_path / "work"), images=8,
                          vae=small, sd=small, flux=small, sd3=small, threads=0, vae_crop=16)


def test_tiny_sd3_trains_and_generates(tmp_path):
    """The tiny-sd3 stage (rectified flow on the shared VAE's latents) saves a pipeline that loads and generates."""
    train_zoo(_tiny_cfg(tmp_path, "vae"))
    cfg = _tiny_cfg(tmp_path, "tiny-sd3")
    cfg.sd3 = StageConfig(steps=2, batch_size=4, lr=1e-3, ema_decay=0.5)
    folder = train_zoo(cfg)["tiny-sd3"]
    pipe = load_pipeline(str(folder))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.vae.config.shift_factor != 0
    built = load_pipeline("tiny-sd3", random_init=True)
    trained = dict(pipe.transformer.named_parameters())
    assert any(not torch.equal(p.half(), trained[k].half()) for k, p in built.transformer.named_parameters())
    img = generate(pipe, ["a red circle"], [0], steps=2, guidance=4.0)[0]
    assert img.shape == (64, 64, 3)


def test_export_checkpoint_saves_the_ema_pipeline_of_a_checkpoint(tmp_path):
    """export_checkpoint writes the EMA weights of a stage checkpoint as the pipeline a finished run saves (same
    tensors), with the config at the checkpoint's step; no training runs. Bad requests name what is wrong."""
    train_zoo(_tiny_cfg(tmp_path, "vae"))
    cfg = _tiny_cfg(tmp_path, "tiny-sd")
    cfg.sd = StageConfig(steps=2, batch_size=4, lr=1e-3, ema_decay=0.5)
    trained = load_pipeline(str(train_zoo(cfg)["tiny-sd"]))
    ckpt = tmp_path / "work" / "checkpoints" / "tiny-sd-seed0.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    exp = _tiny_cfg(tmp_path, "tiny-sd")
    exp.sd.steps, exp.out, exp.export_checkpoint = 50, str(tmp_path / "exported"), str(ckpt)
    folder = train_zoo(exp)["tiny-sd"]
    assert json.loads((folder / TRAIN_CONFIG_FILE).read_text())["sd"]["steps"] == 2  # what was trained, not 50
    pipe = load_pipeline(str(folder))
    for name in ("unet", "text_encoder"):
        want = getattr(trained, name).state_dict()
        for k, v in getattr(pipe, name).state_dict().items():
            assert torch.equal(v, want[k]), (name, k)
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2  # the checkpoint was not trained on
    exp.model = "vae"
    with pytest.raises(ValueError, match="model must be one of"):
        train_zoo(exp)
    exp.model, exp.export_checkpoint = "tiny-sd", str(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        train_zoo(exp)


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
    # flux.heads widens the transformer (32 dims a head); a checkpoint of the 2-head run is refused by name
    wide = _tiny_cfg(tmp_path, "tiny-flux")
    wide.flux = StageConfig(steps=2, batch_size=4, lr=1e-3, ema_decay=0.5, heads=4)
    wide.resume = True
    with pytest.raises(ValueError, match="another architecture.*transformer"):
        train_zoo(wide)
    wide.resume = False
    pipe = load_pipeline(str(train_zoo(wide)["tiny-flux"]))
    assert pipe.transformer.config.num_attention_heads == 4 and pipe.transformer.inner_dim == 128
    sd = _tiny_cfg(tmp_path / "all", "all")  # refused before the VAE stage runs: nothing rendered or trained
    sd.sd = StageConfig(steps=1, heads=4)
    with pytest.raises(ValueError, match="sd.heads / head_dim set tiny-flux's attention heads only"):
        train_zoo(sd)
    assert not (tmp_path / "all").exists()


def test_flux_with_its_own_factor_2_vae(tmp_path):
    """flux.vae_factor 2: tiny-flux trains its own VAE first (4x32x32 latents), its pipeline packs them into
    16 x 16 tokens and generates 64x64 images; the shared factor-4 VAE is neither needed nor touched."""
    cfg = _tiny_cfg(tmp_path, "tiny-flux")
    cfg.flux = StageConfig(steps=2, batch_size=4, lr=1e-3, ema_decay=0.5, vae_factor=2)
    folder = train_zoo(cfg)["tiny-flux"]
    assert (tmp_path / "work" / "checkpoints" / "vae-f2-seed0" / "config.json").exists()
    assert not (tmp_path / "work" / "checkpoints" / "vae-seed0").exists()
    assert (tmp_path / "work" / "checkpoints" / "tiny-flux-vae-f2-seed0.ckpt").exists()  # not tiny-flux-seed0.ckpt
    pipe = load_pipeline(str(folder))
    assert pipe.vae_scale_factor == 2 and pipe.vae.config.shift_factor != 0
    lat = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert lat.shape == (1, 4, 32, 32)
    seen = {}

    def count_tokens(module, args, output) -> None:
        seen.setdefault("tokens", args[0].shape[1])

    hook = pipe.transformer.x_embedder.register_forward_hook(count_tokens)
    img = generate(pipe, ["a red circle"], [0], steps=2, guidance=4.0)[0]
    hook.remove()
    assert img.shape == (64, 64, 3) and seen["tokens"] == 16 * 16
    # the checkpoint records its VAE: a VAE retrained (here: perturbed) under the same name is refused on resume
    from diffusers import AutoencoderKL

    ckpt = tmp_path / "work" / "checkpoints" / "tiny-flux-vae-f2-seed0.ckpt"
    assert torch.load(ckpt, weights_only=False)[VAE_SHA_KEY] == vae_fingerprint(cfg, 2)
    vae_dir = tmp_path / "work" / "checkpoints" / "vae-f2-seed0"
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    vae.save_pretrained(vae_dir)
    cfg.flux, cfg.resume = StageConfig(steps=3, batch_size=4, lr=1e-3, ema_decay=0.5, vae_factor=2), True
    with pytest.raises(ValueError, match="trained on another VAE"):
        train_zoo(cfg)
    bad = _tiny_cfg(tmp_path, "tiny-flux")
    bad.flux = StageConfig(steps=1, vae_factor=16)
    with pytest.raises(ValueError, match="flux.vae_factor must be 0 or one of"):
        check_config(bad)
    bad = _tiny_cfg(tmp_path, "tiny-flux")
    bad.sd = StageConfig(steps=1, vae_factor=2)
    with pytest.raises(ValueError, match="sd.vae_factor / vae_channels set tiny-flux's VAE only"):
        check_config(bad)
    bad.sd = StageConfig(steps=1, vae_channels=16)
    with pytest.raises(ValueError, match="sd.vae_factor / vae_channels set tiny-flux's VAE only"):
        check_config(bad)


def test_flux_with_a_flux_shaped_vae_and_adaln_zero(tmp_path):
    """flux.vae_factor 8 + vae_channels 16 (FLUX.1's VAE layout): tiny-flux trains its own 8x8x16 VAE first, under
    its own stage name, and its transformer sees 4 x 4 tokens of 64 numbers; flux.adaln_zero starts every block as
    the identity (the run's first checkpoint still trains those layers away from 0)."""
    from revelio.zoo.train import stage_checkpoint, vae_stage

    assert vae_stage(8, 16) == "vae-f8c16" and vae_stage(2, 4) == "vae-f2" and vae_stage() == "vae"
    cfg = _tiny_cfg(tmp_path, "tiny-flux")
    cfg.flux = StageConfig(steps=2, batch_size=4, lr=1e-3, ema_decay=0.5, vae_factor=8, vae_channels=16,
                           adaln_zero=True)
    assert stage_checkpoint(cfg, "tiny-flux").name == "tiny-flux-vae-f8c16-seed0.ckpt"
    folder = train_zoo(cfg)["tiny-flux"]
    assert (tmp_path / "work" / "checkpoints" / "vae-f8c16-seed0" / "config.json").exists()
    assert not (tmp_path / "work" / "checkpoints" / "vae-seed0").exists()
    pipe = load_pipeline(str(folder))
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.in_channels == 64
    assert pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 16, 8, 8)
    seen = {}
    hook = pipe.transformer.x_embedder.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0].shape) and None)
    img = generate(pipe, ["a red circle"], [0], steps=2, guidance=4.0)[0]
    hook.remove()
    assert img.shape == (64, 64, 3) and tuple(seen["x"][1:]) == (16, 64)
    # two steps of AdamW moved the zeroed layers: they are trained, not frozen at 0
    assert pipe.transformer.proj_out.weight.abs().sum() > 0
    assert pipe.transformer.transformer_blocks[0].norm1.linear.weight.abs().sum() > 0
    from revelio.zoo.builders import build_tiny_flux

    narrow = build_tiny_flux(heads=8, head_dim=16, vae_factor=8, vae_channels=16).transformer
    assert narrow.inner_dim == 128 and tuple(narrow.config.axes_dims_rope) == (4, 6, 6)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        build_tiny_flux(head_dim=12)
    bad = _tiny_cfg(tmp_path, "tiny-flux")
    bad.flux = StageConfig(steps=1, head_dim=12)
    with pytest.raises(ValueError, match="flux.head_dim must be 0 or one of"):
        check_config(bad)
    bad = _tiny_cfg(tmp_path, "tiny-flux")
    bad.flux = StageConfig(steps=1, vae_factor=8, vae_channels=16, teacher="revelio/zoo/weights/tiny-sd")
    with pytest.raises(ValueError, match="flux.teacher needs tiny-flux on the shared VAE"):
        check_config(bad)
    bad = _tiny_cfg(tmp_path, "tiny-sd")
    bad.sd = StageConfig(steps=1, adaln_zero=True)
    with pytest.raises(ValueError, match="are tiny-flux settings"):
        check_config(bad)


def test_adaln_zero_makes_every_block_the_identity():
    """zero_init_modulation on a random tiny-flux: the output is 0 for any input, each double-stream block passes
    both streams through unchanged (gates 0), and the gradient still reaches the zeroed layers (DiT's adaLN-Zero)."""
    from revelio.zoo.builders import build_tiny_flux, zero_init_modulation

    tr = build_tiny_flux(heads=2).transformer
    assert zero_init_modulation(tr) == 2 * 4 + 2 + 2  # norm1 + norm1_context per double block, norm per single, out
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(2, 64, 16, generator=g), torch.randn(2, 32, 64, generator=g)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
    kw = dict(timestep=torch.tensor([0.3, 0.9]), pooled_projections=torch.randn(2, 64, generator=g),
              txt_ids=torch.zeros(32, 3), img_ids=ids.reshape(-1, 3))
    blocks_in = {}
    blk = tr.transformer_blocks[1]
    hook = blk.register_forward_hook(lambda m, a, k, o: blocks_in.update(args=k, out=o), with_kwargs=True)
    out = tr(hidden_states=x, encoder_hidden_states=txt, return_dict=False, **kw)[0]
    hook.remove()
    assert out.shape == (2, 64, 16) and torch.equal(out, torch.zeros_like(out))
    ctx_out, img_out = blocks_in["out"]
    assert torch.equal(img_out, blocks_in["args"]["hidden_states"])
    assert torch.equal(ctx_out, blocks_in["args"]["encoder_hidden_states"])
    loss = (tr(hidden_states=x, encoder_hidden_states=txt, return_dict=False, **kw)[0] - 1).pow(2).mean()
    loss.backward()
    assert tr.proj_out.weight.grad.abs().sum() > 0


def test_zoo_train_command_is_registered(capsys):
    from revelio.cli import run

    run(["zoo", "train", "--help"])
    out = capsys.readouterr().out
    assert "--sd.steps" in out and "--flux.batch_size" in out and "--holdout" in out


def _ckpt_state(path: Path) -> dict:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    state = {f"module/{k}": v for k, v in blob["state_dict"].items()}
    for i, opt in enumerate(blob["optimizer_states"]):
        for pid, st in opt["state"].items():
            state |= {f"adam{i}/{pid}/{k}": v for k, v in st.items()}
    state["sched"] = torch.tensor(blob["lr_schedulers"][0]["last_epoch"])
    return state


@pytest.mark.parametrize("model, multi_from", [("vae", 0), ("tiny-sd", 0), ("tiny-sd", 2)])
def test_resume_after_a_stop_is_bit_identical(tmp_path, model, multi_from, capsys):
    """K steps in one go == a max_minutes stop after step 1, then --resume to K: weights, EMA and Adam equal
    (multi_from 2: the resumed part crosses into the curriculum's second image set)."""
    def cfg(run: str, minutes: float, resume: bool, stage_name: str = model) -> ZooTrainConfig:
        c = _tiny_cfg(tmp_path / run, stage_name)
        c.multi_images = 6
        c.workdir = str(tmp_path / "work")  # shared image and latent caches; checkpoints are per run
        c.checkpoint_dir = str(tmp_path / run / "ckpt")
        c.checkpoint_every, c.resume, c.min_snr_gamma, c.edge_weight, c.vae_full_from = 2, resume, 5.0, 0.5, 0.5
        c.vae = c.sd = StageConfig(steps=4, batch_size=2, lr=1e-3, ema_decay=0.5, max_minutes=minutes,
                                   multi_from_step=multi_from)
        return c

    if model == "tiny-sd":  # each run gets the same trained VAE
        for run in ("straight", "stopped"):
            train_zoo(cfg(run, 0.0, False, "vae"))
    train_zoo(cfg("straight", 0.0, False))
    if model == "vae":
        with pytest.raises(SystemExit, match="resume"):
            train_zoo(cfg("stopped", 1e-9, False))  # stops after its first step
    else:
        train_zoo(cfg("stopped", 1e-9, False))

    def ckpt(run: str) -> Path:
        return tmp_path / run / "ckpt" / f"{model}-seed0.ckpt"

    assert torch.load(ckpt("stopped"), weights_only=False)["global_step"] == 1
    train_zoo(cfg("stopped", 0.0, True))
    assert "resuming from" in capsys.readouterr().out
    a, b = _ckpt_state(ckpt("straight")), _ckpt_state(ckpt("stopped"))
    assert a.keys() == b.keys() and int(a["sched"]) == 4
    assert any(k.startswith("module/ema.") for k in a) and any(k.startswith("adam0/") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_step_batches_enter_at_any_step():
    from revelio.zoo.train import StepBatches

    whole = StepBatches(10, 3, seed=4)
    it = iter(whole)
    first = [next(it) for _ in range(7)]  # 3 batches per epoch: crosses two epoch boundaries
    later = iter(StepBatches(10, 3, seed=4, start=5))
    assert [next(later) for _ in range(2)] == first[5:7]
    assert all(len(set(sum(first[e * 3:e * 3 + 3], []))) == 9 for e in range(2))  # no repeats within an epoch
    assert first[:3] != [next(iter(StepBatches(10, 3, seed=5))) for _ in range(1)] * 3


def test_step_batches_switch_to_the_second_set():
    """The curriculum: steps before ``from_step`` are unchanged, later ones draw only from the appended set,
    epoch by epoch without repeats, and entering at any step gives the same batches."""
    from revelio.zoo.train import StepBatches

    plain, cur = StepBatches(10, 3, seed=4), StepBatches(10, 3, seed=4, second=(4, 7))
    assert [plain.batch(s) for s in range(4)] == [cur.batch(s) for s in range(4)]
    later = [cur.batch(s) for s in range(4, 8)]  # 7 // 3 = 2 batches per epoch of the second set
    assert all(10 <= i < 17 for b in later for i in b)
    assert len(set(later[0] + later[1])) == 6 and later[:2] != later[2:]
    it = iter(StepBatches(10, 3, seed=4, start=5, second=(4, 7)))
    assert [next(it) for _ in range(3)] == later[1:]
    shifted = StepBatches(10, 3, seed=4, second=(6, 7, 4))  # switched later, epochs counted from step 4
    assert [shifted.batch(s) for s in range(6)] == [plain.batch(s) for s in range(6)]
    assert [shifted.batch(s) for s in range(6, 8)] == later[2:]
    with pytest.raises(ValueError, match="larger than the 2 training images"):
        StepBatches(10, 3, seed=4, second=(4, 2))


def test_flow_times_switch_from_logit_normal_to_uniform_at_the_configured_step():
    from revelio.zoo.config import StageConfig
    from revelio.zoo.train import flow_times

    stage = StageConfig(uniform_times_from_step=100)
    before = flow_times(stage, 99, 20000, torch.Generator().manual_seed(3))
    # the logit-normal branch draws exactly what the runs before the key existed drew: sigmoid of one randn
    torch.testing.assert_close(before, torch.sigmoid(torch.randn(20000, generator=torch.Generator().manual_seed(3))))
    after = flow_times(stage, 100, 20000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(after, torch.rand(20000, generator=torch.Generator().manual_seed(3)))
    # uniform puts 10% of the steps above s = 0.9, the logit-normal about 1.4% (P(z > logit 0.9 = 2.197))
    assert abs(float((after > 0.9).float().mean()) - 0.10) < 0.01
    assert abs(float((before > 0.9).float().mean()) - 0.014) < 0.004
    never = StageConfig()  # 0: never uniform
    torch.testing.assert_close(flow_times(never, 10**6, 5, torch.Generator().manual_seed(0)),
                               torch.sigmoid(torch.randn(5, generator=torch.Generator().manual_seed(0))))


def test_time_shift_moves_uniform_noise_levels_towards_pure_noise_from_its_step():
    from revelio.zoo.config import StageConfig
    from revelio.zoo.train import flow_times, shift_times

    # hand-computed: k = 3 maps 0.5 to 1.5 / 2 = 0.75 and keeps the ends
    torch.testing.assert_close(shift_times(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))
    stage = StageConfig(uniform_times_from_step=1, time_shift=3.0, time_shift_from_step=50)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(flow_times(stage, 49, 20000, torch.Generator().manual_seed(3)), u)  # unchanged before
    after = flow_times(stage, 50, 20000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(after, 3 * u / (1 + 2 * u))
    # P(s > 0.8) = P(u > 0.8 / (3 - 2 * 0.8)) = 1 - 4/7: 43% of the steps instead of 20%
    assert abs(float((after > 0.8).float().mean()) - 3 / 7) < 0.01


def test_lr_decay_changes_no_step_before_it_and_reaches_zero_at_the_last_step():
    from revelio.zoo.config import StageConfig
    from revelio.zoo.train import lr_factor

    plain, decayed = StageConfig(steps=100), StageConfig(steps=100, decay_from_step=60)
    assert [lr_factor(plain, 10, s) for s in range(60)] == [lr_factor(decayed, 10, s) for s in range(60)]
    assert lr_factor(plain, 10, 4) == 0.5 and lr_factor(plain, 10, 99) == 1.0  # warm-up, then constant
    assert [lr_factor(decayed, 10, s) for s in (60, 70, 80, 100)] == [1.0, 0.75, 0.5, 0.0]
    with pytest.raises(ValueError, match="must be before steps"):
        lr_factor(StageConfig(steps=100, decay_from_step=100), 10, 0)


def test_upright_training_images_have_their_own_cache(tmp_path):
    """upright: true renders the same captions with every object upright, into a cache of its own name (a run on the
    rotated world never reads the upright images, nor the reverse)."""
    from revelio.zoo.train import data_key, render_cache

    cfg = _tiny_cfg(tmp_path, "tiny-flux")
    up = _tiny_cfg(tmp_path, "tiny-flux")
    up.upright = True
    assert data_key(cfg) != data_key(up) and data_key(cfg, multi=True) != data_key(up, multi=True)
    (a, caps_a), (b, caps_b) = render_cache(cfg), render_cache(up)
    assert caps_a == caps_b and not torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "work").glob("*.pt")) == sorted(
        [f"{data_key(cfg)}.pt", f"{data_key(up)}.pt"])


def test_frozen_text_encoders_stay_at_their_seeded_init(tmp_path):
    """flux.train_text false: two AdamW steps move the transformer, but the saved pipeline's CLIP and T5 are exactly
    the seeded random init (a fresh build), and the stage checkpoint holds no text-encoder tensors; with the default
    (true) the same steps move them. vae.train_text false is refused: the VAE has no text encoder."""
    from revelio.zoo.builders import build_tiny_flux
    from revelio.zoo.train import stage_checkpoint

    train_zoo(_tiny_cfg(tmp_path, "vae"))
    fresh = build_tiny_flux(0)
    moved = {}
    for train_text in (False, True):
        cfg = _tiny_cfg(tmp_path, "tiny-flux")
        cfg.out = str(tmp_path / f"out-{train_text}")
        cfg.checkpoint_dir = str(tmp_path / f"ckpt-{train_text}")
        cfg.flux = StageConfig(steps=2, batch_size=4, lr=1e-2, ema_decay=0.0, train_text=train_text)
        # the VAE is trained once, in the workdir's checkpoints; each run keeps its own stage checkpoint
        Path(cfg.checkpoint_dir).mkdir()
        import shutil

        shutil.copytree(tmp_path / "work" / "checkpoints" / "vae-seed0", Path(cfg.checkpoint_dir) / "vae-seed0")
        pipe = load_pipeline(str(train_zoo(cfg)["tiny-flux"]))
        keys = torch.load(stage_checkpoint(cfg, "tiny-flux"), weights_only=False)["state_dict"].keys()
        moved[train_text] = {
            name: any(not torch.equal(v.half(), getattr(fresh, name).state_dict()[k].half())
                      for k, v in getattr(pipe, name).state_dict().items())
            for name in ("transformer", "text_encoder", "text_encoder_2")}
        assert any(k.startswith("net.text_encoder_2.") for k in keys) == train_text
    # (compared in float16: the pipeline is stored in float16)
    assert moved[True] == {"transformer": True, "text_encoder": True, "text_encoder_2": True}
    assert moved[False] == {"transformer": True, "text_encoder": False, "text_encoder_2": False}
    cfg = _tiny_cfg(tmp_path, "tiny-flux")
    cfg.vae = StageConfig(steps=1, train_text=False)
    with pytest.raises(ValueError, match="vae.train_text"):
        check_config(cfg)


def test_without_the_pooled_text_path_the_prompt_acts_through_attention_only(tmp_path):
    """flux.pooled_text false: after two AdamW steps (lr 1e-2) the pooled projection is still exactly 0, so the
    transformer's output does not change when only the pooled CLIP vector does, while the T5 tokens still change
    it; sd.pooled_text false is refused (SD has no pooled path)."""
    train_zoo(_tiny_cfg(tmp_path, "vae"))
    cfg = _tiny_cfg(tmp_path, "tiny-flux")
    cfg.flux = StageConfig(steps=2, batch_size=4, lr=1e-2, ema_decay=0.0, pooled_text=False)
    pipe = load_pipeline(str(train_zoo(cfg)["tiny-flux"])).to(torch.float32)
    proj = pipe.transformer.time_text_embed.text_embedder.linear_2
    assert not proj.weight.any() and not proj.bias.any()
    assert pipe.transformer.transformer_blocks[0].norm1.linear.weight.abs().sum() > 0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 16, generator=gen)
    txt, pooled = torch.randn(1, 8, 64, generator=gen), torch.randn(2, 64, generator=gen)
    ids = pipe._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
    with torch.no_grad():
        out = [pipe.transformer(hidden_states=x, timestep=torch.tensor([0.5]), pooled_projections=p[None],
                                encoder_hidden_states=t, txt_ids=torch.zeros(8, 3), img_ids=ids).sample
               for p, t in ((pooled[0], txt), (pooled[1], txt), (pooled[0], txt.flip(1)))]
    assert torch.equal(out[0], out[1]) and not torch.allclose(out[0], out[2])
    bad = _tiny_cfg(tmp_path, "tiny-sd")
    bad.sd = StageConfig(steps=1, pooled_text=False)
    with pytest.raises(ValueError, match="pooled_text is a tiny-flux setting"):
        check_config(bad)


def test_qk_scale_multiplies_every_attention_logit():
    """scale_qk_norms(t, 4): every query / key RMSNorm of tiny-flux starts at weight 2, and the attention logits
    of a double-stream block, recomputed by hand from its projections, are exactly 4x those of the unscaled copy."""
    import copy

    from diffusers.models.embeddings import apply_rotary_emb

    from revelio.zoo.builders import build_tiny_flux, scale_qk_norms

    base = build_tiny_flux(0).transformer.float()
    scaled = copy.deepcopy(base)
    assert scale_qk_norms(scaled, 4.0) == 4 * 4 + 2 * 2  # 4 double blocks x 4 norms, 2 single blocks x 2
    gen = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 64, 64, generator=gen), torch.randn(1, 5, 64, generator=gen)
    ids = torch.cat([torch.zeros(5, 3), build_tiny_flux(0)._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)])
    rope = base.pos_embed(ids)

    def logits(t) -> torch.Tensor:
        attn = t.transformer_blocks[0].attn
        q = attn.norm_q(attn.to_q(x).unflatten(-1, (attn.heads, -1)))
        k = attn.norm_k(attn.to_k(x).unflatten(-1, (attn.heads, -1)))
        eq = attn.norm_added_q(attn.add_q_proj(txt).unflatten(-1, (attn.heads, -1)))
        ek = attn.norm_added_k(attn.add_k_proj(txt).unflatten(-1, (attn.heads, -1)))
        q, k = (apply_rotary_emb(torch.cat(p, 1), rope, sequence_dim=1) for p in ((eq, q), (ek, k)))
        return torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5

    with torch.no_grad():
        torch.testing.assert_close(logits(scaled), 4 * logits(base), rtol=1e-5, atol=1e-5)
    assert torch.equal(scaled.transformer_blocks[0].attn.norm_added_k.weight, torch.full((32,), 2.0))
    with pytest.raises(ValueError, match="scale must be > 0"):
        scale_qk_norms(scaled, 0.0)
    # an init setting on top of init_from would be silently overwritten by the loaded weights: refused
    cfg = ZooTrainConfig(model="tiny-flux")
    cfg.flux = StageConfig(steps=1, qk_scale=4.0, init_from="revelio/zoo/weights/tiny-flux")
    with pytest.raises(ValueError, match="adaln_zero / qk_scale set the seeded random init"):
        check_config(cfg)
