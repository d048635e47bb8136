"""The family adapters answer every model-specific question, checked against the real pipelines they serve.

One test per question, each over every family: tiny-sd (UNet), tiny-flux and tiny-sd3 (MM-DiT),
and the tiny PixArt, DiT and SDXL pipelines of ``test_extraction_archs``. And a scan that no
module outside ``extraction/adapters.py`` tells families apart itself.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from extraction.adapters import ADAPTERS, get_adapter
from test_extraction_archs import _tiny_family_pipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # pixels: 8x8 latents, a 4x4 token grid for the patch-2 transformers


@pytest.fixture(scope="module")
def pipes(tiny_sd, tiny_flux):
    from revelio.zoo import load_pipeline

    out = {"unet": tiny_sd, "flux": tiny_flux, "sd3": load_pipeline("tiny-sd3"),
           "pixart": _tiny_family_pipe("pixart"), "dit": _tiny_family_pipe("dit"), "sdxl": _tiny_family_pipe("sdxl")}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
        for m in p.components.values():  # built, not loaded: switch dropout off as from_pretrained does
            if isinstance(m, torch.nn.Module):
                m.eval()
    return out


def _calls(pipe, **kw):
    """Run ``pipe`` and record each denoiser call's latent batch size and (h, w) token grid."""
    ad = get_adapter(pipe)
    seen = []

    def hook(_m, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        seen.append((x.shape[0], ad.token_grid(args, kwargs)))

    if ad.kind == "pixart":
        kw["use_resolution_binning"] = False  # the tiny PixArt's sample size has no aspect-ratio bins
    h = ad.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(**kw, output_type="latent", generator=torch.Generator("cpu").manual_seed(0))
    finally:
        h.remove()
    return seen


def test_identity_one_adapter_class_per_family(pipes):
    want = {"unet": ("UNetAdapter", "unet", "unet", "cfg", "separate", False),
            "sdxl": ("UNetAdapter", "unet", "unet", "cfg", "separate", False),
            "flux": ("FluxAdapter", "mmdit", "flux", "true_cfg", "joint", True),
            "sd3": ("SD3Adapter", "mmdit", "sd3", "cfg", "joint", True),
            "pixart": ("PixArtAdapter", "dit", "pixart", "cfg", "separate", False),
            "dit": ("DiTAdapter", "dit", "dit", "cfg", None, False)}
    for name, pipe in pipes.items():
        ad = get_adapter(pipe)
        assert (type(ad).__name__, ad.family, ad.kind, ad.guidance, ad.cross_attention, ad.flow) == want[name], name
        assert sum(cls.accepts(ad.denoiser) for cls in ADAPTERS) == 1, name  # exactly one family claims it
        assert get_adapter(pipe).is_sdxl == (name == "sdxl") if name in ("unet", "sdxl") else True


def test_text_encoders_word_encoder_and_length(pipes):
    ad = {k: get_adapter(p) for k, p in pipes.items()}
    assert list(ad["unet"].text_encoders()) == ["text_encoder"]
    assert list(ad["flux"].text_encoders()) == ["text_encoder", "text_encoder_2"]
    assert list(ad["sd3"].text_encoders()) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert list(ad["pixart"].text_encoders()) == ["text_encoder"] and ad["dit"].text_encoders() == {}
    # the encoder whose tokens are the text keys words are read at: CLIP (UNet), T5 (the others)
    for name, attr in (("unet", ""), ("flux", "_2"), ("sd3", "_3"), ("pixart", "")):
        tok, enc = ad[name].word_encoder()
        assert tok is getattr(pipes[name], f"tokenizer{attr}") and enc is getattr(pipes[name], f"text_encoder{attr}")
    assert ad["dit"].word_encoder() == (None, None)
    # T5 length: the tokenizer's (32 for the zoo, 16 for the tiny PixArt), never more than the pipeline's default
    assert [ad[k].text_length() for k in ("unet", "flux", "sd3", "pixart", "dit")] == [None, 32, 32, 16, None]
    assert ad["sd3"].text_key_offset(109, 32) == 77 and ad["flux"].text_key_offset(32, 32) == 0


def test_t5_length_defaults_to_the_pipelines_own(pipes):
    """The T5 length is the pipeline's own ``max_sequence_length`` default (PixArt-alpha 120, PixArt-sigma 300,
    SD3 256, Flux 512) capped by the tokenizer: extraction encodes prompts as generation does."""
    from diffusers import PixArtSigmaPipeline

    alpha = pipes["pixart"]
    sigma = PixArtSigmaPipeline(**alpha.components)  # the same tiny parts under the sigma pipeline
    a, s = get_adapter(alpha), get_adapter(sigma)
    assert type(s).__name__ == "PixArtAdapter" and (a.default_text_length, s.default_text_length) == (120, 300)
    assert get_adapter(pipes["sd3"]).default_text_length == 256 and get_adapter(pipes["flux"]).default_text_length == 512
    assert get_adapter(pipes["unet"]).default_text_length is None and get_adapter(pipes["dit"]).text_length() is None
    tok, old = alpha.tokenizer, alpha.tokenizer.model_max_length
    try:
        tok.model_max_length = 512  # a real T5 tokenizer's length: the pipeline's default wins
        assert (a.text_length(), s.text_length()) == (120, 300)
        assert a.generation_kwargs() == s.generation_kwargs() == {}  # the pipelines' defaults: nothing to pass
        assert s.encode_prompts(["a red circle"])["encoder_hidden_states"].shape[1] == 300
    finally:
        tok.model_max_length = old


def test_encode_prompts_is_what_the_pipeline_generates_with(pipes):
    """The adapter's conditioning equals the pipeline's own encoding under the adapter's generation arguments
    (PixArt included: both use the tokenizer's 16 T5 tokens, not the pipeline's default 120)."""
    prompts = ["a red circle", "a blue square"]
    for name in ("unet", "flux", "sd3", "pixart", "sdxl"):
        pipe, ad = pipes[name], get_adapter(pipes[name])
        cond = ad.encode_prompts(prompts)
        assert not cond["encoder_hidden_states"].requires_grad
        n = ad.generation_kwargs().get("max_sequence_length")
        extra = {} if n is None else {"max_sequence_length": n}
        with torch.no_grad():  # as inside pipe(...)
            if name == "flux":
                own = pipe.encode_prompt(prompts, None, **extra)[0]
            elif name == "sd3":
                own = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, **extra)[0]
            elif name in ("sdxl", "pixart"):
                own = pipe.encode_prompt(prompts, **({"do_classifier_free_guidance": False} | extra))[0]
            else:
                own = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
        assert torch.equal(cond["encoder_hidden_states"], own), name
    assert get_adapter(pipes["pixart"]).generation_kwargs() == {"max_sequence_length": 16}
    assert get_adapter(pipes["dit"]).encode_prompts(["", "1"])["class_labels"].tolist() == [10, 1]
    with torch.enable_grad():  # training keeps the graph
        assert get_adapter(pipes["unet"]).encode_prompts(["a"], grad=True)["encoder_hidden_states"].requires_grad


def test_cross_attention_modules(pipes):
    ad = {k: get_adapter(p) for k, p in pipes.items()}
    unet = ad["unet"].cross_attention_modules()
    assert unet and all(n.endswith(".attn2") and n.startswith(("down_blocks", "up_blocks")) for n in unet)
    with_mid = ad["unet"].cross_attention_modules(include_mid=True)
    assert set(with_mid) > set(unet) and all(n.startswith("mid_block") for n in set(with_mid) - set(unet))
    for name in ("flux", "sd3"):
        mods = ad[name].cross_attention_modules()
        blocks = pipes[name].transformer.transformer_blocks
        assert list(mods) == [f"transformer_blocks.{i}.attn" for i in range(len(blocks))]
        assert all(m is b.attn for m, b in zip(mods.values(), blocks))
    assert list(ad["pixart"].cross_attention_modules()) == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert ad["dit"].cross_attention_modules() == {}
    assert ad["flux"].image_rows(32, 16) == slice(32, 48) and ad["sd3"].image_rows(109, 16) == slice(0, 16)


def test_token_grid_packing_and_one_call(pipes):
    """The grid a call's hook reads equals the latents' grid; Flux packs 2x2 and unpacks losslessly;
    ``forward`` returns the prediction in latent layout for every family."""
    lat = torch.randn(2, 4, SIZE // 4, SIZE // 4)
    for name, pipe in pipes.items():
        ad = get_adapter(pipe)
        grids = []
        h = ad.denoiser.register_forward_pre_hook(lambda m, a, k: grids.append(ad.token_grid(a, k)), with_kwargs=True)
        try:
            out = ad.forward(ad.noise(lat, 500, torch.Generator().manual_seed(0)), 500,
                             ad.encode_prompts(["1", "2"] if name == "dit" else ["a", "b"]))
        finally:
            h.remove()
        assert grids == [ad.image_grid(lat)], name
        assert out.shape[0] == 2 and out.shape[-2:] == lat.shape[-2:], name
        want = (8, 8) if name in ("unet", "sdxl") else (4, 4)
        assert ad.image_grid(lat) == want and ad.n_tokens(want) == (None if name in ("unet", "sdxl") else 16)
        packed = ad.pack(lat)
        if name == "flux":
            assert packed.shape == (2, 16, 16) and torch.equal(ad.unpack(packed, 8, 8), lat)
        else:
            assert packed is lat and ad.unpack(lat, 8, 8) is lat
    assert get_adapter(pipes["sd3"]).max_image_size() == 16 * 2 * 4  # pos_embed_max_size 16, patch 2, VAE 4
    assert get_adapter(pipes["flux"]).max_image_size() is None and get_adapter(pipes["unet"]).max_image_size() is None


def test_noising_and_training_target(pipes):
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for name in ("flux", "sd3"):
        ad = get_adapter(pipes[name])
        s = torch.tensor([0.1, 0.5, 0.9])
        np.testing.assert_allclose(ad.add_noise(x0, eps, s), (1 - s[:, None, None, None]) * x0
                                   + s[:, None, None, None] * eps, atol=1e-6)
        assert torch.equal(ad.training_target(x0, eps), eps - x0)
        assert torch.equal(ad.model_time(250, 2), torch.full((2,), 0.25))
    for name in ("unet", "pixart", "dit"):
        ad = get_adapter(pipes[name])
        t = torch.tensor([0, 400, 999])
        assert torch.equal(ad.add_noise(x0, eps, t), pipes[name].scheduler.add_noise(x0, eps, t))
        assert torch.equal(ad.training_target(x0, eps, t), eps)  # epsilon prediction
        assert ad.model_time(25, 2).tolist() == [25, 25]


def test_generation_kwargs_guidance_and_calls_per_step_match_real_runs(pipes):
    """What the adapter says about guidance is what the pipeline does: Flux without a guidance embedding
    runs true CFG (two calls a step), the others one batched [unconditional, conditional] call."""
    ad = {k: get_adapter(p) for k, p in pipes.items()}
    kw = ad["flux"].generation_kwargs(4.0)
    assert kw == {"max_sequence_length": 32, "true_cfg_scale": 4.0, "negative_prompt": ""}
    assert ad["flux"].generation_kwargs(4.0, batch=2, negative="blue")["negative_prompt"] == ["blue", "blue"]
    assert ad["flux"].generation_kwargs(1.0, negative="blue") == {"max_sequence_length": 32}  # no guidance, no CFG
    assert ad["unet"].generation_kwargs(4.0, batch=2, negative="x") == {"guidance_scale": 4.0,
                                                                         "negative_prompt": ["x", "x"]}
    assert ad["sd3"].generation_kwargs(4.0) == {"max_sequence_length": 32, "guidance_scale": 4.0}
    steps = 2
    for name in ("unet", "flux", "sd3", "pixart"):
        for scale in (4.0, 1.0):
            gen = ad[name].generation_kwargs(scale)
            seen = _calls(pipes[name], prompt="a red circle", num_inference_steps=steps, height=SIZE, width=SIZE,
                          **gen)
            calls, batched = ad[name].denoiser_calls_per_step(gen), ad[name].batched_cfg(gen)
            assert len(seen) == steps * calls, (name, scale)
            assert {b for b, _ in seen} == {2 if batched else 1}, (name, scale)
            assert (calls, batched) == {("flux", 4.0): (2, False), ("flux", 1.0): (1, False)}.get(
                (name, scale), (1, scale > 1)), (name, scale)
            f = pipes[name].vae_scale_factor  # 4, or 2 for the trained tiny-flux (its own VAE)
            assert {g for _, g in seen} == {ad[name].image_grid(torch.zeros(1, 4, SIZE // f, SIZE // f))}
    assert ad["unet"].batched_cfg({}) is True  # the pipeline's default guidance_scale (7.5) is > 1


def test_hook_depth_key_is_the_order_a_call_passes_the_blocks(pipes):
    """Sorting a family's block hooks by ``hook_depth_key`` (names only, as probe reports do from a store) gives the
    order one real denoiser call runs them in; the families' depth tables agree on the names they share."""
    from extraction.adapters import hook_depth_key

    shared: dict[str, int] = {}
    for cls in ADAPTERS:
        for name, depth in cls.module_depth.items():
            assert shared.setdefault(name, depth) == depth, (cls.__name__, name)
    lat = torch.randn(1, 4, SIZE // 4, SIZE // 4)
    for name, pipe in pipes.items():
        ad = get_adapter(pipe)
        modules = dict(ad.denoiser.named_modules())
        fired: list[str] = []
        handles = [modules[b].register_forward_hook(lambda m, a, o, b=b: fired.append(b)) for b in ad.block_names()]
        try:
            ad.forward(ad.noise(lat, 500, torch.Generator().manual_seed(0)), 500,
                       ad.encode_prompts(["1"] if name == "dit" else ["a"]))
        finally:
            for h in handles:
                h.remove()
        assert len(fired) == len(ad.block_names()) > 1, name
        assert sorted(ad.block_names(), key=hook_depth_key) == fired, name


def test_daam_on_pixart_reads_its_t5_cross_attention(pipes):
    """DAAM asks the adapter for the cross-attention modules and word encoder, so PixArt (T5 ``attn2``) works;
    the T5 padding keys the pipeline masks get no attention."""
    from revelio.saliency import trace

    pipe = pipes["pixart"]
    with trace(pipe) as tc:
        pipe("a red circle", num_inference_steps=2, height=SIZE, width=SIZE, output_type="latent",
             use_resolution_binning=False,
             generator=torch.Generator("cpu").manual_seed(0), **get_adapter(pipe).generation_kwargs(4.0))
    maps = tc.maps()
    assert maps.shape == (1, 16, 4, 4) and tc.calls == 2
    n_real = sum(1 for i in tc.input_ids[0] if i != pipe.tokenizer.pad_token_id)
    assert float(maps[0, n_real:].max()) < 1e-6 < float(maps[0, :n_real].sum(0).min())
    assert tc.word_map("circle").shape == (4, 4)


# --- no family detection outside the adapters ----------------------------------------------------------------

DETECTION = [
    r"type\([^)]*\)\.__name__\s*(==|!=|in\b)",  # comparing class names
    r"\bin\s+type\([^)]*\)\.__name__",
    r"[\"'](Flux|StableDiffusion|PixArt|SD3|DiT|UNet2D)\w*[\"']\s+(not\s+)?in\b",
    r"isinstance\([^)]*\b(Flux|SD3|StableDiffusion|PixArt|DiT|UNet2D)\w*",
    r"(hasattr|getattr)\([^)]*[\"'](unet|transformer|single_transformer_blocks|tokenizer_[23]|text_encoder_[23]|"
    r"guidance_embeds|caption_channels)[\"']",
    r"\.(unet|transformer|tokenizer_[23]|text_encoder_[23])\b",
    r"_pack_latents|_unpack_latents|_prepare_latent_image_ids|guidance_embeds|do_classifier_free_guidance",
]
# where the pipeline-building code itself lives (it constructs the models, it does not tell them apart)
EXEMPT = {"extraction/adapters.py", "revelio/zoo/builders.py"}


def family_detection(root: Path) -> list[str]:
    hits = []
    for folder in ("extraction", "revelio", "sae", "probes", "benchmarks"):
        for f in sorted((root / folder).rglob("*.py")):
            rel = f.relative_to(root).as_posix()
            if rel in EXEMPT:
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if any(re.search(p, code) for p in DETECTION):
                    hits.append(f"{rel}:{i}: {line.strip()}")
    return hits


def test_no_module_outside_the_adapters_tells_families_apart():
    assert family_detection(ROOT) == []


def test_the_detection_scan_catches_what_it_should(tmp_path):
    (tmp_path / "revelio").mkdir()
    (tmp_path / "revelio" / "x.py").write_text(
        'if "Flux" in type(pipe).__name__:\n    pass\nden = pipe.transformer\nok = "Flux is a model"  # "Flux" in\n'
        'name = type(pipe).__name__\n')
    assert [h.split(": ", 1)[0] for h in family_detection(tmp_path)] == ["revelio/x.py:1", "revelio/x.py:3"]
