"""Tiny-config diffusers pipelines (random, seeded weights) for 64x64 RGB images.

All three use the same tiny AutoencoderKL (factor 4: 64x64 images -> 4x16x16 latents; tiny-flux
can take a factor-2 one, 4x32x32 latents) and the offline tokenizers. The configs are small versions of the real ones, so every
code path (hooks, attention processors, noising) is the one real models take.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from .tokenizers import build_clip_tokenizer, build_t5_tokenizer

IMAGE_SIZE = 64
LATENT_CHANNELS = 4
TEXT_DIM = 64
MAX_TOKENS = 32


VAE_FACTORS = (2, 4, 8)  # spatial downsampling factors build_vae makes
# tiny-flux's rotary axes per head size (flux.head_dim): the first axis is Flux's unused one, the others rows, columns
ROPE_AXES = {32: (4, 14, 14), 24: (4, 10, 10), 20: (4, 8, 8), 16: (4, 6, 6)}


def build_vae(factor: int = 4, channels: int = LATENT_CHANNELS) -> AutoencoderKL:
    """The zoo's AutoencoderKL: 64x64 RGB -> ``channels`` x (64/factor)^2 latents (factor 4: three blocks of 32,
    64, 64 channels; factor 2: the first two of them; factor 8: a fourth block of 64, e.g. with 16 channels the
    shape of FLUX.1's VAE, 8x8x16 latents)."""
    if factor not in VAE_FACTORS:
        raise ValueError(f"build_vae: factor must be one of {VAE_FACTORS}, got {factor}")
    if channels < 1:
        raise ValueError(f"build_vae: channels must be >= 1, got {channels}")
    blocks = {8: (32, 64, 64, 64), 4: (32, 64, 64), 2: (32, 64)}[factor]
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks, layers_per_block=1, norm_num_groups=16, sample_size=IMAGE_SIZE,
        scaling_factor=1.0, shift_factor=0.0, mid_block_add_attention=False,
    )


def _clip_config(tok, projection: bool = False) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def _t5(tok) -> T5EncoderModel:
    cfg = T5Config(vocab_size=len(tok), d_model=TEXT_DIM, d_kv=16, d_ff=4 * TEXT_DIM, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    return T5EncoderModel(cfg)


def build_tiny_sd(seed: int = 0) -> StableDiffusionPipeline:
    """UNet2DConditionModel with cross-attention at 16x16, 8x8 and the 4x4 mid block; DDPM, epsilon."""
    torch.manual_seed(seed)
    tok = build_clip_tokenizer(MAX_TOKENS)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=TEXT_DIM,
        attention_head_dim=8, norm_num_groups=16,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon", clip_sample=False,
                              steps_offset=1)
    return StableDiffusionPipeline(vae=build_vae(), text_encoder=CLIPTextModel(_clip_config(tok)), tokenizer=tok,
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_flux(seed: int = 0, heads: int = 2, vae_factor: int = 4, layers: int = 4, single_layers: int = 2,
                    vae_channels: int = LATENT_CHANNELS, head_dim: int = 32) -> FluxPipeline:
    """FluxTransformer2DModel with 4 double-stream (MM-DiT) and 2 single-stream blocks; rectified flow.

    2 heads of 32 dims with rotary axes (4, 14, 14): Flux's only positional signal is RoPE (theta 10000), and
    with 4 heads of 16 dims (axes 4, 6, 6) the one useful frequency per axis turns 1 rad per token, so on the
    8 x 8 token grid offsets 0 and 6 look alike. Trained that way for 48000 steps, the image tokens attended
    to offset 7 as much as to offset 2-3 and single-object shapes stayed at 31% (docs/zoo.md). With 14 dims
    per axis the lowest useful frequency (0.27 rad per token) spans the grid without wrapping.

    ``heads``: attention heads of ``head_dim`` dims each, so the width is head_dim x heads (2 x 32: the
    random-init default and the shipped v2 weights, 0.77M parameters; ``flux.heads`` in the training config).
    ``head_dim`` (``flux.head_dim``): 32 (rotary axes 4, 14, 14), 24 (4, 10, 10), 20 (4, 8, 8) or 16 (4, 6, 6: one
    useful frequency per axis, enough for the 4 x 4 token grid of a factor-8 VAE, not for 8 x 8, see above).

    ``vae_factor``: the VAE's downsampling (``build_vae``). The pipeline packs 2x2 latents into a token, so with
    factor 4 a 64x64 image is 8 x 8 tokens of 8x8 pixels, with factor 2 16 x 16 tokens of 4x4 pixels (the size of
    one tiny-sd UNet latent pixel), with factor 8 4 x 4 tokens of 16x16 pixels; ``flux.vae_factor`` in the
    training config. ``vae_channels``: its latent channels (4; 16 with factor 8 is FLUX.1's VAE layout), so a
    token holds 4 x vae_channels numbers; ``flux.vae_channels``.

    ``layers`` / ``single_layers``: double-stream / single-stream blocks (4 / 2: the default and the shipped
    weights; ``flux.layers`` / ``flux.single_layers`` in the training config)."""
    if head_dim not in ROPE_AXES:
        raise ValueError(f"build_tiny_flux: head_dim must be one of {sorted(ROPE_AXES)} (rotary axes {ROPE_AXES}), "
                         f"got {head_dim}")
    if heads < 1 or layers < 1 or single_layers < 0:
        raise ValueError(f"build_tiny_flux: needs heads >= 1, layers >= 1, single_layers >= 0; got {heads}, {layers}, "
                         f"{single_layers}")
    torch.manual_seed(seed)
    tok, tok2 = build_clip_tokenizer(MAX_TOKENS), build_t5_tokenizer(MAX_TOKENS)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * vae_channels, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=False,
        axes_dims_rope=ROPE_AXES[head_dim],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return FluxPipeline(scheduler=scheduler, vae=build_vae(vae_factor, vae_channels),
                        text_encoder=CLIPTextModel(_clip_config(tok)),
                        tokenizer=tok, text_encoder_2=_t5(tok2), tokenizer_2=tok2, transformer=transformer)


def zero_init_modulation(transformer: torch.nn.Module) -> int:
    """adaLN-Zero (Peebles & Xie 2023, DiT): zero the linear layer of every adaptive norm of a Flux or SD3
    transformer (shift, scale and gate of each block, the final norm) and its ``proj_out``, so that every block
    starts as the identity and the output at 0; diffusers' constructors keep PyTorch's default init.
    Returns the number of layers zeroed."""
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle

    layers = [m.linear for m in transformer.modules()
              if isinstance(m, (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous))]
    if getattr(transformer, "proj_out", None) is not None:
        layers.append(transformer.proj_out)
    with torch.no_grad():
        for lin in layers:
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
    return len(layers)


def build_tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3Transformer2DModel (MM-DiT, 4 joint blocks) with two CLIPs and a T5; rectified flow."""
    torch.manual_seed(seed)
    tok, tok2, tok3 = build_clip_tokenizer(MAX_TOKENS), build_clip_tokenizer(MAX_TOKENS), build_t5_tokenizer(MAX_TOKENS)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 4, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=4, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=TEXT_DIM,
        caption_projection_dim=64, pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=16,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=build_vae(),
        text_encoder=CLIPTextModelWithProjection(_clip_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok2)), tokenizer_2=tok2,
        text_encoder_3=_t5(tok3), tokenizer_3=tok3,
    )


def drop_pooled_text(transformer: torch.nn.Module) -> None:
    """Cut the pooled-text path of a Flux transformer: zero the last layer of ``time_text_embed.text_embedder``
    (so the pooled CLIP vector adds exactly 0 to the timestep embedding) and freeze that projection, so training
    cannot bring it back. The global modulation then carries the noise level only, and the prompt reaches the
    image tokens through joint attention alone (``flux.pooled_text: false``)."""
    proj = getattr(getattr(transformer, "time_text_embed", None), "text_embedder", None)
    if proj is None:
        raise ValueError(f"{type(transformer).__name__} has no time_text_embed.text_embedder (a pooled-text path)")
    with torch.no_grad():
        proj.linear_2.weight.zero_()
        proj.linear_2.bias.zero_()
    proj.requires_grad_(False)


def scale_qk_norms(transformer: torch.nn.Module, scale: float) -> int:
    """Multiply the weights of every RMSNorm on attention queries and keys (``norm_q``, ``norm_k``,
    ``norm_added_q``, ``norm_added_k`` of a Flux or SD3 transformer) by ``sqrt(scale)``, so every attention logit
    is ``scale`` times what it was (``flux.qk_scale``). Queries and keys are RMS-normalised per head, so a logit
    is at most sqrt(head_dim) times the product of these weights; diffusers starts them at 1. Returns the number
    of norms scaled."""
    if scale <= 0:
        raise ValueError(f"scale_qk_norms: scale must be > 0, got {scale}")
    n = 0
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if name.rsplit(".", 1)[-1] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k") and \
                    getattr(module, "weight", None) is not None:
                module.weight.mul_(scale ** 0.5)
                n += 1
    return n
