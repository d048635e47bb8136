"""Real architectures from their published configs: every shipped config's hooks exist and give the documented shapes.

Two checks per family, both through the adapters' own forward path (packing, time ids, streams):

* full depth, on the ``meta`` device (shapes only, no memory, no compute): every hook named in
  ``configs/extract/<name>.yaml`` exists and gives the shape documented in that file's header;
* truncated depth with the real widths and random weights, computed on CPU at a small size: the
  first and last blocks give the documented channels and the token grid scaled to that size.
  SD3, PixArt and DiT run by default; the big-width UNets and Flux (0.5B+ parameters even
  truncated) run when ``REVELIO_FULL_ARCH_TESTS=1``.
"""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from extraction.adapters import get_adapter
from extraction.hooks import ActivationCapture

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "extract"
FULL = os.environ.get("REVELIO_FULL_ARCH_TESTS") == "1"

# The published denoiser configs (diffusers config.json values of each hub model).
UNET_SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, norm_num_groups=32)
UNET_SD21 = {**UNET_SD15, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
             "use_linear_projection": True}
UNET_SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
FLUX_SCHNELL = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=False, axes_dims_rope=(16, 56, 56))
PIXART_512 = dict(sample_size=64, patch_size=2, in_channels=4, out_channels=8, num_layers=28, attention_head_dim=72,
                  num_attention_heads=16, cross_attention_dim=1152, caption_channels=4096,
                  norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                  use_additional_conditions=False)
DIT_XL2 = dict(sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_layers=28, attention_head_dim=72,
               num_attention_heads=16, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")

# name -> (denoiser class, config, depth keys to truncate, latent channels, text/cond sizes)
REAL = {
    "sd15": ("UNet2DConditionModel", UNET_SD15, {"layers_per_block": 1}, 4),
    "sd21": ("UNet2DConditionModel", UNET_SD21, {"layers_per_block": 1}, 4),
    "sdxl": ("UNet2DConditionModel", UNET_SDXL, {"layers_per_block": 1, "transformer_layers_per_block": 1}, 4),
    "sd3": ("SD3Transformer2DModel", SD3_MEDIUM, {"num_layers": 2}, 16),
    "flux-schnell": ("FluxTransformer2DModel", FLUX_SCHNELL, {"num_layers": 1, "num_single_layers": 1}, 16),
    "pixart-alpha": ("PixArtTransformer2DModel", PIXART_512, {"num_layers": 2}, 4),
    "dit-xl-2": ("DiTTransformer2DModel", DIT_XL2, {"num_layers": 2}, 4),
}
CHEAP = {"sd3", "pixart-alpha", "dit-xl-2"}  # under 100M parameters when truncated


def documented(name: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """The shipped config and the per-image shapes its header documents for each hook."""
    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    cfg = yaml.safe_load(text)
    line = next(ln for ln in text.splitlines() if "Shapes per image" in ln)
    pairs = dict((n, tuple(int(v) for v in s.split(","))) for n, s in re.findall(r"([\w.]+ ?\w*) \(([\d, ]+)\)", line))
    if "every block" in pairs:
        return cfg, {h: pairs["every block"] for h in cfg["hooks"]}
    return cfg, {h: pairs[h] for h in cfg["hooks"]}


def build_pipe(name: str, depth: dict | None, device: str):
    """A real pipeline class around the real denoiser (full depth or truncated), a small VAE and the real scheduler."""
    import diffusers as D

    cls_name, cfg, trunc, lat_ch = REAL[name]
    cfg = {**cfg, **(depth or {})}
    torch.manual_seed(0)
    with torch.device(device):
        den = getattr(D, cls_name)(**cfg)
    # factor-8 VAE with the model's latent channels; only its config matters here (latents are given)
    vae = D.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=lat_ch, block_out_channels=(8, 8, 8, 8),
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          layers_per_block=1, norm_num_groups=8)
    ddpm = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    if name in ("sd15", "sd21"):
        return D.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=den,
                                         scheduler=D.PNDMScheduler(**ddpm), safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
    if name == "sdxl":
        return D.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                           tokenizer_2=None, unet=den, scheduler=D.EulerDiscreteScheduler(**ddpm))
    if name == "sd3":
        return D.StableDiffusion3Pipeline(transformer=den, scheduler=D.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                          vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                          tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    if name == "flux-schnell":
        return D.FluxPipeline(scheduler=D.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                              tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=den)
    if name == "pixart-alpha":
        return D.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=den,
                                     scheduler=D.DPMSolverMultistepScheduler())
    return D.DiTPipeline(transformer=den, vae=vae, scheduler=D.DDIMScheduler())


def conditioning(name: str, b: int, device: str) -> dict:
    """What each family's text/class encoder would hand the denoiser (random, right shapes)."""
    r = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    if name in ("sd15", "sd21"):
        return {"encoder_hidden_states": r(b, 77, REAL[name][1]["cross_attention_dim"])}
    if name == "sdxl":
        return {"encoder_hidden_states": r(b, 77, 2048), "text_embeds": r(b, 1280)}
    if name == "sd3":
        return {"encoder_hidden_states": r(b, 16, 4096), "pooled_projections": r(b, 2048)}
    if name == "flux-schnell":
        return {"encoder_hidden_states": r(b, 16, 4096), "pooled_projections": r(b, 768),
                "txt_ids": torch.zeros(16, 3, device=device)}
    if name == "pixart-alpha":
        return {"encoder_hidden_states": r(b, 16, 4096), "encoder_attention_mask": torch.ones(b, 16, device=device)}
    return {"class_labels": torch.tensor([3, 1000][:b], device=device)}


def run_hooks(pipe, name: str, hooks: list[str], latent: int, device: str) -> dict[str, tuple[int, ...]]:
    ad = get_adapter(pipe)
    ad.check_hooks(hooks)
    lat = torch.randn(2, REAL[name][3], latent, latent, device=device)
    with ActivationCapture(ad, hooks, device=None) as cap:
        cap.reset(ad.n_image_tokens(lat))
        out = ad.forward(lat, 25, conditioning(name, 2, device))
    # the prediction lives in latent space (PixArt/DiT add a learned-variance half: 2C channels)
    assert out.shape[0] == 2 and out.shape[1] in (lat.shape[1], 2 * lat.shape[1]) and out.shape[-2:] == lat.shape[-2:]
    return {h: tuple(cap.acts[h].shape[1:]) for h in hooks}, cap.acts


@pytest.mark.parametrize("name", list(REAL))
def test_full_depth_hooks_exist_with_documented_shapes(name):
    cfg, shapes = documented(name)
    pipe = build_pipe(name, None, "meta")
    ad = get_adapter(pipe)
    assert ad.family == {"UNet2DConditionModel": "unet", "DiTTransformer2DModel": "dit",
                         "PixArtTransformer2DModel": "dit"}.get(REAL[name][0], "mmdit")
    got, _ = run_hooks(pipe, name, cfg["hooks"], cfg["data"]["size"] // 8, "meta")
    assert got == shapes


@pytest.mark.parametrize("name", [n for n in REAL if n in CHEAP or FULL])
def test_truncated_real_widths_compute(name):
    cfg, shapes = documented(name)
    pipe = build_pipe(name, REAL[name][2], "cpu")
    ad = get_adapter(pipe)
    names = set(ad.hook_names())
    # UNets keep every block (fewer layers per block): the shipped hooks; DiTs: first and last block
    hooks = [h for h in cfg["hooks"] if h in names] or [ad.block_names()[0], ad.block_names()[-1]]
    r = cfg["data"]["size"] // 8 // 8  # documented latent side / the side computed here (8)
    got, acts = run_hooks(pipe, name, hooks, 8, "cpu")
    for h in hooks:
        doc = shapes.get(h, next(iter(shapes.values())))
        want = (doc[0] // r ** 2, doc[1]) if len(doc) == 2 else (doc[0], doc[1] // r, doc[2] // r)
        assert got[h] == want, (h, got[h], want)
        assert torch.isfinite(acts[h]).all() and acts[h].std() > 0


def test_zoo_configs_hooks_and_shapes(tiny_sd, tiny_flux):
    for name, pipe in (("tiny-sd", tiny_sd), ("tiny-flux", tiny_flux)):
        cfg, shapes = documented(name)
        ad = get_adapter(pipe)
        side = cfg["data"]["size"] // pipe.vae_scale_factor  # latent side; the header documents the shipped model
        lat = torch.randn(1, 4, side, side)
        cond = ad.encode_prompts(["a red circle"])
        with ActivationCapture(ad, cfg["hooks"]) as cap:
            cap.reset(ad.n_image_tokens(lat))
            ad.forward(lat, 25, cond)
        assert {h: tuple(cap.acts[h].shape[1:]) for h in cfg["hooks"]} == shapes


def test_shipped_configs_load_and_unsupported_pipeline_is_clear():
    from revelio.commands.extract import ExtractConfig
    from revelio.config import load

    for p in sorted(CONFIGS.glob("*.yaml")):
        cfg = load(ExtractConfig, p)
        assert cfg.hooks and cfg.timesteps
    with pytest.raises(ValueError, match="supported denoisers"):
        get_adapter(object())


def _tiny_family_pipe(kind: str):
    """Tiny end-to-end pipelines (real text encoders/tokenizers) for the families the zoo does not ship."""
    import diffusers as D
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from revelio.zoo.builders import build_vae
    from revelio.zoo.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    torch.manual_seed(0)
    ddpm = D.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if kind == "sdxl":
        tok = build_clip_tokenizer(16)
        clip = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=16, projection_dim=32, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        unet = D.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
        return D.StableDiffusionXLPipeline(vae=build_vae(), text_encoder=CLIPTextModel(CLIPTextConfig(**clip)),
                                           text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
                                           tokenizer=tok, tokenizer_2=build_clip_tokenizer(16), unet=unet,
                                           scheduler=ddpm)
    if kind == "pixart":
        tok = build_t5_tokenizer(16)
        t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                     relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))
        tr = D.PixArtTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, cross_attention_dim=32,
                                        caption_channels=32, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                        norm_eps=1e-6, use_additional_conditions=False)
        return D.PixArtAlphaPipeline(tokenizer=tok, text_encoder=t5, vae=build_vae(), transformer=tr, scheduler=ddpm)
    tr = D.DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=4, num_embeds_ada_norm=10,
                                 norm_type="ada_norm_zero")
    return D.DiTPipeline(transformer=tr, vae=build_vae(), scheduler=ddpm, id2label={0: "circle", 1: "square"})


@pytest.mark.parametrize("kind", ["sdxl", "pixart", "dit", "tiny-sd3"])
def test_other_families_extract_end_to_end(kind, tmp_path):
    """Prompt encoding (SDXL pooled + time ids, PixArt T5, DiT class ids, SD3 3 encoders) through a full run."""
    from extraction.run import ExtractionPlan, Extractor
    from extraction.store import open_store
    from revelio.datasets import Shapes
    from revelio.zoo import load_pipeline

    pipe = load_pipeline("tiny-sd3") if kind == "tiny-sd3" else _tiny_family_pipe(kind)
    hook = {"sdxl": "up_blocks.0", "pixart": "transformer_blocks.1", "dit": "transformer_blocks.1",
            "tiny-sd3": "transformer_blocks.3"}[kind]
    prompt, template = ("template", "{label_id}") if kind == "dit" else ("caption", "")
    plan = ExtractionPlan(hooks=[hook], timesteps=[25, 600], out="", data={"size": 32}, batch_size=3, progress=False,
                          prompt=prompt, template=template, pooling="none")
    ds = Shapes(size=32, count=3, seed=0)
    s = Extractor(pipe, plan).run(ds, tmp_path / "s.h5")
    with open_store(s.path) as st:
        x = st.read(hook, 600, slice(None))
        assert st.n_images == 3 and np.isfinite(x).all()
        if kind == "sdxl":
            assert st.layout(hook, 25) == "NCHW" and x.shape == (3, 64, 8, 8)
        else:  # 32 px -> 8x8 latents -> 4x4 patches
            assert st.layout(hook, 25) == "NTC" and st.spatial(hook, 25) == (4, 4) and x.shape[1] == 16
        assert not np.allclose(x, st.read(hook, 25, slice(None)))
    if kind == "dit":
        ad = get_adapter(pipe)
        assert ad.class_ids(["", "3", "square"]).tolist() == [10, 3, 1]
        with pytest.raises(ValueError, match="class-conditional"):
            ad.class_ids(["a red circle"])
