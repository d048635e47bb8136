"""Extraction: noising math, latents, hooks (streams, capture modes, cleanup), prompts, resume, refusal, skips."""

import numpy as np
import pytest
import torch
from PIL import Image

from extraction.adapters import draw_noise, get_adapter, sample_generators
from extraction.hooks import ActivationCapture
from extraction.run import ExtractionPlan, Extractor, make_prompt
from extraction.store import StoreError, open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plan(tmp_path, **kw):
    base = dict(hooks=["mid_block"], timesteps=[25], out=str(tmp_path) + "/a.h5", data={"size": 32}, batch_size=4,
                progress=False, storage_dtype="float32")
    base.update(kw)
    return ExtractionPlan(**base)


def _shapes(n=4, size=32, seed=0):
    from revelio.datasets import Shapes

    return Shapes(size=size, count=n, seed=seed)


# --- noising and latents -----------------------------------------------------------------------------------------


def test_ddpm_noise_matches_hand_formula(tiny_sd):
    ad = get_adapter(tiny_sd)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    # scaled_linear betas: linspace of square roots, squared; abar_t = prod_{s<=t} (1 - beta_s)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    for t in (0, 25, 999):
        abar = np.prod(1 - betas[: t + 1])
        want = np.sqrt(abar) * x0.double() + np.sqrt(1 - abar) * eps.double()
        np.testing.assert_allclose(ad.noise(x0, t, noise=eps).double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="1000"):
        ad.noise(x0, 1000, noise=eps)


def test_flow_noise_and_seeded_generators(tiny_flux):
    ad = get_adapter(tiny_flux)
    assert ad.flow and ad.family == "mmdit"
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    np.testing.assert_allclose(ad.noise(x0, 250, noise=eps), 0.75 * x0 + 0.25 * eps, rtol=1e-6, atol=1e-6)
    # per-image generators: an image's noise does not depend on which batch it is in
    both = draw_noise((2, 4, 8, 8), sample_generators(0, ["a", "b"], 25))
    alone = draw_noise((1, 4, 8, 8), sample_generators(0, ["b"], 25))
    np.testing.assert_array_equal(both[1:], alone)
    other_t = draw_noise((1, 4, 8, 8), sample_generators(0, ["b"], 26))
    assert not torch.equal(alone, other_t)


def test_encode_images_uses_mode_shift_and_scale(tiny_flux):
    from diffusers import AutoencoderKL, FluxPipeline

    vae = AutoencoderKL.from_config({**tiny_flux.vae.config, "scaling_factor": 0.5, "shift_factor": 0.1})
    vae.load_state_dict(tiny_flux.vae.state_dict())
    pipe = FluxPipeline(**{**tiny_flux.components, "vae": vae})
    ad = get_adapter(pipe)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    px = ad.preprocess([img], 32)
    assert px.shape == (1, 3, 32, 32) and px.min() >= -1 and px.max() <= 1
    with torch.no_grad():
        mean = vae.encode(px).latent_dist.mean  # the mode of a diagonal Gaussian
    np.testing.assert_allclose(ad.encode_images(px), (mean - 0.1) * 0.5, rtol=1e-5, atol=1e-6)


# --- hooks ------------------------------------------------------------------------------------------------------


def test_hooked_up_block_is_the_real_activation(tiny_sd):
    """The last up block's captured output, through the UNet's output head, gives the UNet's prediction."""
    ad = get_adapter(tiny_sd)
    ex = Extractor(tiny_sd, _plan(None, hooks=["up_blocks.2"], out="unused.h5"))
    lat = ad.encode_images(ad.preprocess([s.image for s in _shapes(2)], 32))
    cond = ex._cond(["a red circle", ""])
    noisy = ad.noise(lat, 25, sample_generators(0, ["x", "y"], 25))
    with ActivationCapture(ad, ["up_blocks.2"]) as cap:
        cap.reset(None)
        pred = ad.forward(noisy, 25, cond)
    u = ad.denoiser
    with torch.no_grad():
        head = u.conv_out(u.conv_act(u.conv_norm_out(cap.acts["up_blocks.2"])))
    np.testing.assert_allclose(head, pred, rtol=1e-4, atol=1e-5)


def test_flux_streams_chain_block_to_block(tiny_flux):
    """Image stream of block i is the input of block i+1: the hook keeps image tokens, not text tokens."""
    ad = get_adapter(tiny_flux)
    lat = torch.randn(2, 4, 8, 8)
    cond = ad.encode_prompts(["a red circle", "a blue square"])
    names = ["transformer_blocks.3", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    outs, ins = {}, {}
    for capture, store in (("output", outs), ("input", ins)):
        with ActivationCapture(ad, names, capture) as cap:
            cap.reset(ad.n_image_tokens(lat))
            ad.forward(lat, 250, cond)
            store.update(cap.acts)
    width = tiny_flux.transformer.inner_dim  # heads x head dim of the shipped tiny-flux
    assert outs["transformer_blocks.3"].shape == (2, 16, width)  # 4x4 grid of packed 2x2 latent patches
    np.testing.assert_allclose(ins["single_transformer_blocks.0"], outs["transformer_blocks.3"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ins["single_transformer_blocks.1"], outs["single_transformer_blocks.0"],
                               rtol=1e-5, atol=1e-6)


def test_capture_modes_pooling_and_cleanup(tiny_sd):
    ad = get_adapter(tiny_sd)
    lat = torch.randn(2, 4, 8, 8)
    cond = ad.encode_prompts(["", ""])
    got = {}
    for capture in ("output", "input", "delta"):
        for pooling in ("none", "mean"):
            with ActivationCapture(ad, ["mid_block"], capture, pooling) as cap:
                cap.reset(None)
                ad.forward(lat, 25, cond)
                got[capture, pooling] = cap.acts["mid_block"]
    np.testing.assert_allclose(got["delta", "none"], got["output", "none"] - got["input", "none"], atol=1e-5)
    np.testing.assert_allclose(got["output", "mean"], got["output", "none"].mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    assert got["input", "none"].shape == (2, 64, 2, 2)
    # delta on a block that changes shape fails clearly, and the hooks are gone afterwards
    with pytest.raises(ValueError, match="delta"):
        with ActivationCapture(ad, ["up_blocks.1"], "delta") as cap:
            cap.reset(None)
            ad.forward(lat, 25, cond)
    assert all(not m._forward_hooks for m in ad.denoiser.modules())
    with pytest.raises(ValueError, match="output, input, delta"):
        ActivationCapture(ad, ["mid_block"], "middle")


def test_wrong_hook_fails_before_any_work(tiny_sd, tmp_path):
    with pytest.raises(KeyError) as e:
        Extractor(tiny_sd, _plan(tmp_path, hooks=["mid_block", "up_block.1"]))
    msg = str(e.value)
    assert "close matches: up_blocks.1" in msg and "mid_block" in msg
    assert not (tmp_path / "a.h5").exists()


def test_prompt_modes():
    names = ["circle", "square"]
    assert make_prompt("empty", "", "a red circle", 0, names) == ""
    assert make_prompt("caption", "", "a red circle", 0, names) == "a red circle"
    assert make_prompt("template", "a photo of a {label}", "x", 1, names) == "a photo of a square"
    assert make_prompt("template", "{label_id}", "x", 1, names) == "1"
    with pytest.raises(ValueError, match="label_id"):
        make_prompt("template", "{colour}", "x", 1, names)
    with pytest.raises(ValueError, match="empty, caption, template"):
        ExtractionPlan(hooks=["mid_block"], timesteps=[1], out="x", prompt="class").validate()


# --- runs: batch independence, resume, refusal, skipped images ----------------------------------------------------


def test_batch_size_independence_and_complete_rerun(tiny_sd, tmp_path, capsys):
    ds = _shapes(5)
    a = Extractor(tiny_sd, _plan(tmp_path, batch_size=2, prompt="caption")).run(ds, tmp_path / "a.h5")
    b = Extractor(tiny_sd, _plan(tmp_path, batch_size=5, prompt="caption")).run(ds, tmp_path / "b.h5")
    assert a.images == b.images == 5
    with open_store(a.path) as sa, open_store(b.path) as sb:
        np.testing.assert_allclose(sa.read("mid_block", 25, slice(None)), sb.read("mid_block", 25, slice(None)),
                                   rtol=1e-4, atol=1e-5)
        assert list(sa.ids) == list(sb.ids) == ds.ids()
    again = Extractor(tiny_sd, _plan(tmp_path, batch_size=3, prompt="caption")).run(ds, tmp_path / "a.h5")
    assert again.already_complete and "already complete" in capsys.readouterr().out


def test_different_config_is_refused(tiny_sd, tmp_path):
    """A Python caller's plan computes its identity itself: another config is refused, a new batch size is not."""
    ds = _shapes(2)
    Extractor(tiny_sd, _plan(tmp_path, batch_size=1)).run(ds, tmp_path / "a.h5")
    with pytest.raises(StoreError, match=r"timesteps: file has \[25\], config has \[50\]"):
        Extractor(tiny_sd, _plan(tmp_path, timesteps=[50])).run(ds, tmp_path / "a.h5")
    with pytest.raises(StoreError, match=r"storage_dtype: file has 'float32', config has 'float16'"):
        Extractor(tiny_sd, _plan(tmp_path, storage_dtype="float16")).run(ds, tmp_path / "a.h5")
    with pytest.raises(StoreError, match=r"data: file has \{'size': 32\}"):
        Extractor(tiny_sd, _plan(tmp_path, data={"size": 32, "name": "other"})).run(ds, tmp_path / "a.h5")
    again = Extractor(tiny_sd, _plan(tmp_path, batch_size=3, out="elsewhere.h5", progress=True)).run(ds, tmp_path / "a.h5")
    assert again.already_complete


def test_plan_identity_and_provenance():
    """The keys that do not change the stored arrays stay out of the identity; the plan names its sources."""
    plan = ExtractionPlan(model={"id": "m", "dtype": "float32", "device": "cuda:3"}, data={"name": "d", "size": 48},
                          hooks=["mid_block"], timesteps=[5], batch_size=7, out="x.h5", progress=False)
    ident = plan.identity()
    assert ident["model"] == {"id": "m", "dtype": "float32"} and ident["data"] == {"name": "d", "size": 48}
    assert not {"batch_size", "out", "progress"} & set(ident) and ident["timesteps"] == [5]
    prov = plan.provenance()
    assert prov["model"] == "m" and prov["dataset"] == "d" and prov["config"]["batch_size"] == 7
    assert plan.size == 48 and ExtractionPlan().size is None
    bare = ExtractionPlan().identity()  # a plan with no model or data section still records every data key
    assert bare["model"] is None and bare["storage_dtype"] == "float16" and bare["hooks"] == ["mid_block", "up_blocks.1"]


def test_unreadable_images_are_skipped_and_recorded(tiny_sd, tmp_path, capsys):
    from revelio.datasets import ImageFolder

    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((20, 24, 3), 60 * i + 40, np.uint8)).save(root / cls / f"{i}.png")
    (root / "cat" / "1.png").write_bytes(b"not a png")
    ds = ImageFolder(root, size=32)
    s = Extractor(tiny_sd, _plan(tmp_path, prompt="template", batch_size=2)).run(ds, tmp_path / "f.h5")
    assert s.images == 3 and s.skipped == ["cat/1.png"]
    assert "extract: 3 images done, 1 skipped" in capsys.readouterr().out  # the end summary
    with open_store(s.path) as st:
        assert list(st.ids) == ["cat/0.png", "dog/0.png", "dog/1.png"]
        assert list(st.labels) == [0, 1, 1] and st.captions[1] == "a photo of a dog"
        assert st.skipped == ["cat/1.png"] and st.read("mid_block", 25, slice(None)).shape[0] == 3


def test_interrupted_store_is_not_readable_as_finished(tiny_sd, tmp_path):
    """A store whose run stopped part-way says so, and resuming it completes the same rows."""
    import h5py

    ds = _shapes(4)
    ref = Extractor(tiny_sd, _plan(tmp_path, batch_size=2)).run(ds, tmp_path / "ref.h5")
    part = tmp_path / "part.h5"
    Extractor(tiny_sd, _plan(tmp_path, batch_size=2)).run(ds, part, positions=None)
    with h5py.File(part, "r+") as f:  # what a kill after the first batch leaves: 2 done rows, not complete
        f["images/done"].resize(4, axis=0)
        f["images/done"][2:] = False
        f.attrs["complete"] = False
        for h in ("acts/mid_block/t25",):
            f[h].resize(4, axis=0)
            f[h][2:] = 0
        for n in ("images/id", "images/label", "images/caption", "images/source"):
            f[n].resize(4, axis=0)
    with pytest.raises(StoreError, match="not a finished store"):
        open_store(part)
    with open_store(part, allow_incomplete=True) as st:
        assert st.n_images == 2
    Extractor(tiny_sd, _plan(tmp_path, batch_size=3)).run(ds, part)
    with open_store(part) as a, open_store(ref.path) as b:
        np.testing.assert_allclose(a.read("mid_block", 25, slice(None)), b.read("mid_block", 25, slice(None)),
                                   rtol=1e-4, atol=1e-5)
        assert list(a.ids) == list(b.ids)


def test_compressed_float16_store_reads_back(tiny_sd, tmp_path):
    import h5py

    ds = _shapes(3)
    a = Extractor(tiny_sd, _plan(tmp_path, storage_dtype="float32")).run(ds, tmp_path / "a.h5")
    b = Extractor(tiny_sd, _plan(tmp_path, storage_dtype="float16", compression="gzip")).run(ds, tmp_path / "b.h5")
    with h5py.File(b.path, "r") as f:
        d = f["acts/mid_block/t25"]
        assert d.compression == "gzip" and d.dtype == np.float16
    with open_store(a.path) as sa, open_store(b.path) as sb:
        x, y = sa.read("mid_block", 25, slice(None)), sb.read("mid_block", 25, slice(None))
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, x, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="none, gzip, lzf"):
        _plan(tmp_path, compression="zstd").validate()


def test_cli_config_is_the_plan():
    """``revelio extract``'s config is the stage's plan: the same keys and defaults, only model/data typed by the CLI,
    and the identity a store records is the one stores written before this class was shared hold."""
    import dataclasses

    from revelio.config import load
    from revelio.extraction_config import ExtractConfig

    assert issubclass(ExtractConfig, ExtractionPlan) and set(ExtractConfig.__annotations__) == {"model", "data"}
    assert [f.name for f in dataclasses.fields(ExtractConfig)] == [f.name for f in dataclasses.fields(ExtractionPlan)]
    cfg = load(ExtractConfig, overrides={"hooks": ["up_blocks.1"], "batch_size": 3, "model": {"device": "cuda"}})
    assert cfg.storage_dtype == ExtractionPlan().storage_dtype == "float16" and cfg.size == 64
    assert cfg.identity() == {
        "model": {"id": "tiny-sd", "dtype": "float32"},
        "data": {"name": "shapes", "path": None, "size": 64, "count": 256, "split": "train", "seed": 0,
                 "label": "shape", "caption_template": "a photo of a {label}"},
        "hooks": ["up_blocks.1"], "timesteps": [25], "capture": "output", "pooling": "none", "prompt": "empty",
        "template": "a photo of a {label}", "storage_dtype": "float16", "compression": "none", "seed": 0}
