"""Saliency: DAAM and ConceptAttention checked against independent re-computations from module weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from revelio.config import RevelioError
from revelio.saliency import concept_attention, trace
from revelio.saliency.words import WordNotInPrompt

PROMPT = "a red circle and a bluey square"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _grid(pipe, height: int, width: int) -> tuple[int, int]:
    """The image-token grid of a transformer pipeline (2 x 2 latent patches; the shipped VAE's factor)."""
    f = 2 * pipe.vae_scale_factor
    return height // f, width // f


def _record_inputs(modules):
    """Test-side forward pre-hooks recording every call's (args, kwargs) of each module."""
    calls = {name: [] for name in modules}
    handles = [m.register_forward_pre_hook(lambda _m, a, k, n=name: calls[n].append((a, k)), with_kwargs=True)
               for name, m in modules.items()]
    return calls, handles


# --- naive math, written from the papers, not from the library code ---------------------------------------

def _linear(x, lin):
    return x @ lin.weight.T + (lin.bias if lin.bias is not None else 0)


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def _ada_zero(norm, x, temb):
    shift, scale, gate, shift2, scale2, gate2 = _linear(F.silu(temb), norm.linear).chunk(6, dim=1)
    return _ln(x) * (1 + scale[:, None]) + shift[:, None], gate, shift2, scale2, gate2


def _rope(x, cos, sin):
    """Rotate consecutive channel pairs of (B, S, H, d) by the angle whose cos/sin the rows give."""
    z = torch.complex(x[..., 0::2], x[..., 1::2])
    rot = torch.complex(cos[:, 0::2], sin[:, 0::2])[None, :, None, :]
    z = z * rot
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def _heads(x, h):
    return x.reshape(x.shape[0], x.shape[1], h, -1)


def _softmax_attention(q, k, v):
    """Per head: softmax(q k^T / sqrt(d)) v, heads concatenated. q (B,S,H,d)."""
    w = torch.einsum("bshd,bthd->bhst", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhst,bthd->bshd", w.softmax(-1), v).flatten(2)


def _gelu_ff(ff, x):
    return _linear(F.gelu(_linear(x, ff.net[0].proj), approximate="tanh"), ff.net[2])


def _flux_block_by_hand(block, img, txt, temb, rope, concepts, concept_temb=None):
    """One Flux double-stream block for image, prompt and concept tokens, written out by hand.

    ``concept_temb``: the embedding driving the concepts' adaptive norm (default: the block's ``temb``).

    Returns (ConceptAttention score softmaxed over concepts, cross-attention score, updated concepts).
    """
    attn, h = block.attn, block.attn.heads
    cos, sin = rope
    n_txt = txt.shape[1]
    x, *_ = _ada_zero(block.norm1, img, temb)
    t, *_ = _ada_zero(block.norm1_context, txt, temb)
    c, g_msa, sh, sc, g_mlp = _ada_zero(block.norm1_context, concepts, temb if concept_temb is None else concept_temb)
    qi = _rope(_rms(_heads(_linear(x, attn.to_q), h), attn.norm_q), cos[n_txt:], sin[n_txt:])
    ki = _rope(_rms(_heads(_linear(x, attn.to_k), h), attn.norm_k), cos[n_txt:], sin[n_txt:])
    vi = _heads(_linear(x, attn.to_v), h)
    qt = _rope(_rms(_heads(_linear(t, attn.add_q_proj), h), attn.norm_added_q), cos[:n_txt], sin[:n_txt])
    kt = _rope(_rms(_heads(_linear(t, attn.add_k_proj), h), attn.norm_added_k), cos[:n_txt], sin[:n_txt])
    vt = _heads(_linear(t, attn.add_v_proj), h)
    c0 = lambda a: a[:1].expand(concepts.shape[1], -1)  # noqa: E731 - concepts sit at text position 0
    qc = _rope(_rms(_heads(_linear(c, attn.add_q_proj), h), attn.norm_added_q), c0(cos), c0(sin))
    kc = _rope(_rms(_heads(_linear(c, attn.add_k_proj), h), attn.norm_added_k), c0(cos), c0(sin))
    vc = _heads(_linear(c, attn.add_v_proj), h)
    o_img = _softmax_attention(qi, torch.cat([kt, ki], 1), torch.cat([vt, vi], 1))
    o_c = _softmax_attention(qc, torch.cat([kc, ki], 1), torch.cat([vc, vi], 1))
    score = (o_img @ o_c.transpose(1, 2)).softmax(-1)
    cross = (torch.einsum("bnhd,bchd->bhnc", qi, kc) / qi.shape[-1] ** 0.5).mean(1).softmax(-1)
    new = concepts + g_msa[:, None] * _linear(o_c, attn.to_add_out)
    new = new + g_mlp[:, None] * _gelu_ff(block.ff_context, _ln(new) * (1 + sc[:, None]) + sh[:, None])
    return score, cross, new


# --- DAAM ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["reference", "clamp_each_step"])
def test_daam_matches_naive_softmax_maps_and_drops_cfg_half(tiny_sd, order):
    """Naive DAAM in either aggregation order; "reference" is daam 0.2.0's: per layer and head the
    probabilities are summed over steps at their native resolution, upsampled and clamped only at the end."""
    unet = tiny_sd.unet
    attn2 = {n: m for n, m in unet.named_modules() if n.endswith("attn2") and not n.startswith("mid_block")}
    calls, handles = _record_inputs(attn2)
    try:
        with trace(tiny_sd, order=order) as tc:
            tiny_sd(PROMPT, num_inference_steps=2, guidance_scale=7.5, height=32, width=32, generator=_gen(),
                    output_type="latent")
    finally:
        for hd in handles:
            hd.remove()
    assert set(tc.modules) == set(attn2) and tc.calls == 2

    def up(maps):  # (1, T, s, s) -> latent size 8x8, bicubic
        return maps if maps.shape[-1] == 8 else F.interpolate(maps, size=(8, 8), mode="bicubic", align_corners=False)

    expected, count = torch.zeros(32, 8, 8), 0
    for name, m in attn2.items():
        assert len(calls[name]) == 2
        per_head = {}
        for args, kwargs in calls[name]:
            x, ctx = args[0], kwargs["encoder_hidden_states"]
            assert x.shape[0] == 2  # CFG batch: [unconditional, conditional]
            x, ctx = x[1], ctx[1]  # conditional half only
            q = (x @ m.to_q.weight.T).reshape(x.shape[0], m.heads, -1)
            k = (ctx @ m.to_k.weight.T).reshape(ctx.shape[0], m.heads, -1)
            side = int(x.shape[0] ** 0.5)
            for h in range(m.heads):
                p = torch.softmax(q[:, h] @ k[:, h].T / q.shape[-1] ** 0.5, dim=-1)  # (HW, T)
                maps = p.T.reshape(1, -1, side, side)
                if order == "clamp_each_step":
                    expected += up(maps)[0].clamp(min=0)
                else:
                    per_head[h] = per_head.get(h, 0) + maps
                count += 1
        for total in per_head.values():  # reference: upsample and clamp each (layer, head) sum over steps
            expected += up(total)[0].clamp(min=0)
    got = tc.maps()
    assert got.shape == (1, 32, 8, 8)
    torch.testing.assert_close(got[0], expected / count, rtol=1e-4, atol=1e-6)
    if order == "reference":  # the two orders really differ (bicubic overshoot clamped at different times)
        with trace(tiny_sd, order="clamp_each_step") as other:
            tiny_sd(PROMPT, num_inference_steps=2, guidance_scale=7.5, height=32, width=32, generator=_gen(),
                    output_type="latent")
        assert not torch.allclose(other.maps(), got, rtol=1e-4, atol=1e-6)


def test_daam_word_maps_merge_subtokens_and_name_available_words(tiny_sd):
    with trace(tiny_sd) as tc:
        image_a = tiny_sd(PROMPT, num_inference_steps=1, height=32, width=32, generator=_gen(),
                          output_type="latent").images
    image_b = tiny_sd(PROMPT, num_inference_steps=1, height=32, width=32, generator=_gen(),
                      output_type="latent").images
    assert torch.equal(image_a, image_b)  # tracing does not change the image
    words = dict(tc.words())
    assert len(words["bluey"]) == 3 and words["red"] == [2]  # "blu e y" pieces; the start token shifts by one
    torch.testing.assert_close(tc.word_map("bluey"), tc.maps()[0, words["bluey"]].mean(0))
    both_a = [p for w, pos in tc.words() if w == "a" for p in pos]
    assert both_a == [1, 5]
    torch.testing.assert_close(tc.word_map("a"), tc.maps()[0, both_a].mean(0))  # both occurrences
    toks = tc.tokens()  # every row of maps(), start / end / padding included, in key order
    assert len(toks) == tc.maps().shape[1] and [k for _, k in toks] == list(range(len(toks)))
    assert toks[0][0] == "<|startoftext|>" and [toks[p][0] for p in words["bluey"]] == ["blu", "e", "y"]
    assert toks[words["red"][0]][0] == "red" and toks[words["square"][0] + 1][0] == "<|endoftext|>"
    assert (tc.maps() >= 0).all()
    with pytest.raises(WordNotInPrompt, match="available words: a, red, circle, and, bluey, square"):
        tc.word_map("dog")
    for m in tc.modules.values():  # original processors are back
        assert type(m.processor).__name__ == "AttnProcessor2_0"


def test_daam_running_sums_do_not_grow_and_restore_on_error(tiny_sd):
    before = {n: m.processor for n, m in tiny_sd.unet.named_modules() if n.endswith("attn2")}
    sizes = []
    with pytest.raises(RuntimeError, match="boom"):
        with trace(tiny_sd, steps=[1, 2]) as tc:
            tiny_sd(PROMPT, num_inference_steps=2, height=32, width=32, generator=_gen(), output_type="latent")
            first = dict(tc._layer_sums)
            sizes.append(sum(t.numel() for t in tc._layer_sums.values()))
            tiny_sd(PROMPT, num_inference_steps=3, height=32, width=32, generator=_gen(), output_type="latent")
            sizes.append(sum(t.numel() for t in tc._layer_sums.values()))
            raise RuntimeError("boom")
    heads = sum(m.heads for m in tc.modules.values())
    assert tc.calls == 5 and tc._count == 2 * heads  # only denoiser calls 1 and 2 (of 0..4) count
    assert sizes[0] == sizes[1] and set(first) == set(tc.modules)  # one sum per layer, flat in steps
    assert all(tc._layer_sums[n] is first[n] for n in first)  # updated in place
    for n, m in tc.modules.items():  # native resolution: (batch, heads, tokens, h, w)
        assert tc._layer_sums[n].shape[:3] == (1, m.heads, 32) and tc._layer_sums[n].shape[-1] in (8, 4, 2)
    assert all(m.processor is before[n] for n, m in tiny_sd.unet.named_modules() if n.endswith("attn2"))


def test_dit_cross_attention_daam_matches_naive(tiny_flux):
    blocks = tiny_flux.transformer.transformer_blocks
    calls, handles = _record_inputs({str(i): b for i, b in enumerate(blocks)})
    try:
        with trace(tiny_flux) as tc:
            tiny_flux(PROMPT, num_inference_steps=1, height=32, width=48, generator=_gen(), output_type="latent",
                      max_sequence_length=16)
    finally:
        for hd in handles:
            hd.remove()
    expected = 0
    for i, b in enumerate(blocks):
        _, kw = calls[str(i)][0]
        img, txt, temb, (cos, sin) = kw["hidden_states"], kw["encoder_hidden_states"], kw["temb"], kw["image_rotary_emb"]
        attn, h, n_txt = b.attn, b.attn.heads, txt.shape[1]
        x, *_ = _ada_zero(b.norm1, img, temb)
        t, *_ = _ada_zero(b.norm1_context, txt, temb)
        qi = _rope(_rms(_heads(_linear(x, attn.to_q), h), attn.norm_q), cos[n_txt:], sin[n_txt:])
        ki = _rope(_rms(_heads(_linear(x, attn.to_k), h), attn.norm_k), cos[n_txt:], sin[n_txt:])
        kt = _rope(_rms(_heads(_linear(t, attn.add_k_proj), h), attn.norm_added_k), cos[:n_txt], sin[:n_txt])
        w = torch.einsum("bnhd,bthd->bhnt", qi, torch.cat([kt, ki], 1)) / qi.shape[-1] ** 0.5
        expected = expected + w.softmax(-1)[..., :n_txt].sum(1)  # text columns, summed over heads
    expected = expected / (len(blocks) * blocks[0].attn.heads)
    got, grid = tc.maps(), _grid(tiny_flux, 32, 48)
    assert got.shape == (1, 16, *grid)  # T5 tokens on the token grid of a 32x48 image (4 x 6 shipped)
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(1, 16, *grid), rtol=1e-4, atol=1e-6)
    assert [w for w, _ in tc.words()] == ["a", "red", "circle", "and", "a", "bluey", "square"]


def test_two_call_cfg_unconditional_call_is_skipped(tiny_flux):
    kw = dict(prompt=PROMPT, num_inference_steps=1, height=32, width=32, output_type="latent", max_sequence_length=16)
    with trace(tiny_flux) as plain, concept_attention(tiny_flux, ["circle", "square"]) as ca_plain:
        tiny_flux(**kw, generator=_gen())
    with trace(tiny_flux) as tc, concept_attention(tiny_flux, ["circle", "square"]) as ca:
        tiny_flux(**kw, negative_prompt="a green star", true_cfg_scale=2.0, generator=_gen())  # 2 calls per step
    assert tc.calls == 1 and ca.calls == 1
    torch.testing.assert_close(tc.maps(), plain.maps())
    torch.testing.assert_close(ca.maps(), ca_plain.maps())


# --- ConceptAttention ----------------------------------------------------------------------------------------

def _concepts_by_hand(pipe, concepts, encoding):
    """Concept embeddings before context_embedder, from the pipeline's own prompt encoder."""
    tok = pipe.tokenizer_2
    rows = []
    if encoding == "mean":  # each on its own, padded to the longest concept + 1; mean of its word tokens
        max_len = max(len(tok(c, add_special_tokens=False).input_ids) for c in concepts)
        for c in concepts:
            n = len(tok(c, add_special_tokens=False).input_ids)
            emb, _, _ = pipe.encode_prompt(prompt=[c], prompt_2=[c], device="cpu", max_sequence_length=max_len + 1)
            rows.append(emb[0, :n].mean(0))
    else:  # first_token: each encoded exactly like a prompt (padded to the tokenizer's length); first token
        for c in concepts:
            emb, _, _ = pipe.encode_prompt(prompt=[c], prompt_2=[c], device="cpu",
                                           max_sequence_length=tok.model_max_length)
            rows.append(emb[0, 0])
    return torch.stack(rows)


@pytest.mark.parametrize("encoding,modulation", [("reference", "reference"), ("mean", "prompt"),
                                                 ("first_token", "prompt"), ("mean", "zero_pooled")])
def test_concept_attention_matches_hand_computation_of_two_blocks(tiny_flux, encoding, modulation):
    concepts = ["circle", "bluey", "background"]  # "bluey" is several T5 tokens
    blocks = tiny_flux.transformer.transformer_blocks
    calls, handles = _record_inputs({"den": tiny_flux.transformer, **{str(i): b for i, b in enumerate(blocks)}})
    try:
        with concept_attention(tiny_flux, concepts, layers=[0, 1], baseline=True, encoding=encoding,
                               modulation=modulation) as ca:
            tiny_flux(PROMPT, num_inference_steps=1, height=32, width=32, generator=_gen(), output_type="latent",
                      max_sequence_length=16)
    finally:
        for hd in handles:
            hd.remove()
    enc = "first_token" if encoding == "reference" else encoding  # the reference's Flux code
    zero = modulation in ("reference", "zero_pooled")  # its concepts' temb: zero pooled vector
    assert (ca.encoding, ca.modulation) == (enc, "zero_pooled" if zero else "prompt")
    with torch.no_grad():
        stream = _linear(_concepts_by_hand(tiny_flux, concepts, enc), tiny_flux.transformer.context_embedder)[None]
        _, dkw = calls["den"][0]
        scores, crosses = [], []
        for i in range(2):
            _, kw = calls[str(i)][0]
            temb = kw["temb"]
            if zero:  # time embedding of the same timestep with a zero pooled text vector
                tte = tiny_flux.transformer.time_text_embed
                t = dkw["timestep"] * 1000
                temb_c = tte(t, torch.zeros_like(dkw["pooled_projections"]))
                assert not torch.allclose(temb_c, temb)
            else:
                temb_c = temb
            s, cr, stream = _flux_block_by_hand(blocks[i], kw["hidden_states"], kw["encoder_hidden_states"],
                                                temb, kw["image_rotary_emb"], stream, concept_temb=temb_c)
            scores.append(s)
            crosses.append(cr)
    expected = (scores[0] + scores[1]) / 2
    got, grid = ca.maps(), _grid(tiny_flux, 32, 32)
    assert got.shape == (1, 3, *grid)
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(1, 3, *grid), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ca.cross_attention_maps(),
                               ((crosses[0] + crosses[1]) / 2).transpose(1, 2).reshape(1, 3, *grid),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(1, *grid))


def test_sd3_joined_concept_encoding_follows_the_joint_prompt_sequence():
    """SD3's reference encoding: the joined concepts as one prompt; CLIP's start token + one token per concept."""
    from revelio.saliency.mmdit import encode_concepts
    from revelio.zoo import load_pipeline

    pipe = load_pipeline("tiny-sd3")
    concepts = ["circle", "square", "background"]
    emb, lead = encode_concepts(pipe, "sd3", concepts, "joined")
    with torch.no_grad():
        joint = pipe.encode_prompt("circle square background", None, None, device="cpu",
                                   do_classifier_free_guidance=False)[0]
    assert lead == 1 and emb.shape == (4, joint.shape[-1])
    torch.testing.assert_close(emb, joint[0, :4])
    kw = dict(prompt=PROMPT, num_inference_steps=1, height=32, width=32, output_type="latent", guidance_scale=1.0)
    with concept_attention(pipe, concepts, layers=[-2, -1]) as ref, \
            concept_attention(pipe, concepts, layers=[-2, -1], encoding="mean") as mean:
        pipe(**kw, generator=_gen())
    assert ref.encoding == "joined" and ref.modulation == "prompt"
    assert ref.maps().shape == mean.maps().shape == (1, 3, 4, 4)  # the start token gets no map
    torch.testing.assert_close(ref.maps().sum(1), torch.ones(1, 4, 4))
    assert not torch.allclose(ref.maps(), mean.maps())
    with pytest.raises(RevelioError, match="reference's SD3 encoding"):
        concept_attention(load_pipeline("tiny-flux"), concepts, encoding="joined")
    with pytest.raises(RevelioError, match="not one of"):
        concept_attention(pipe, concepts, modulation="pooled")


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_concept_attention_leaves_the_image_bit_identical(name, tiny_flux):
    from revelio.zoo import load_pipeline

    pipe = tiny_flux if name == "tiny-flux" else load_pipeline("tiny-sd3")
    kw = dict(prompt=PROMPT, num_inference_steps=1, height=32, width=48, output_type="pt")
    if name == "tiny-sd3":
        kw["guidance_scale"] = 5.0  # CFG batch: the unconditional half must be dropped
    plain = pipe(**kw, generator=_gen(3)).images
    originals = [b.attn.processor for b in pipe.transformer.transformer_blocks]
    with concept_attention(pipe, ["circle", "square", "sky", "background"], layers=[-2, -1]) as ca:
        traced = pipe(**kw, generator=_gen(3)).images
    assert torch.equal(plain, traced)
    assert [b.attn.processor for b in pipe.transformer.transformer_blocks] == originals
    maps, grid = ca.maps(), _grid(pipe, 32, 48)
    assert maps.shape == (1, 4, *grid) and torch.isfinite(maps).all()
    torch.testing.assert_close(maps.sum(1), torch.ones(1, *grid))


def test_concept_attention_refuses_bad_input(tiny_sd, tiny_flux):
    with pytest.raises(RevelioError, match="use DAAM"):
        concept_attention(tiny_sd, ["circle"])
    with pytest.raises(RevelioError, match="concept list is empty"):
        concept_attention(tiny_flux, [])
    with pytest.raises(RevelioError, match="4 double-stream blocks"):
        concept_attention(tiny_flux, ["circle"], layers=[7])


# --- the command -------------------------------------------------------------------------------------------

def test_saliency_command_writes_maps_and_overlays(tmp_path, tiny_flux):
    from revelio.cli import run
    from revelio.saliency.io import load_maps

    out = tmp_path / "sal"
    written = run(["saliency", "--concepts", "[circle, square, background]", "--steps", "1", "--size", "32",
                   "--prompts", "[a red circle and a blue square]", "--out", str(out), "--progress", "false"])
    assert [p.suffix for p in written] == [".png"] and written[0].stat().st_size > 0
    maps, concepts, meta = load_maps(written[0].with_suffix(".npz"))
    assert concepts == ["circle", "square", "background"] and maps.shape == (3, *_grid(tiny_flux, 32, 32))
    assert meta["method"] == "concept_attention" and meta["model"] == "tiny-flux"
    np.testing.assert_allclose(maps.sum(0), 1, rtol=1e-5)
    run(["saliency", "--method", "daam", "--model.id", "tiny-sd", "--source", "images", "--data.count", "1",
         "--size", "32", "--out", str(out / "img"), "--progress", "false"])
    (npz,) = (out / "img").glob("*.npz")
    maps, concepts, meta = load_maps(npz)
    assert maps.shape == (len(concepts), 8, 8) and "background" not in concepts  # words of the caption only
    with pytest.raises(RevelioError, match="concept list is empty"):
        run(["saliency", "--out", str(out)])
    with pytest.raises(RevelioError, match="valid: concept_attention, cross_attention, daam"):
        run(["saliency", "--method", "gradcam"])


def test_concept_embedding_depends_on_the_list_only_in_mean_encoding(tiny_flux):
    """first_token pads every concept like a prompt, so its embedding is its own; "mean" pads to the longest
    concept of the list, and T5 runs without an attention mask, so a longer concept changes "red" a little."""
    from revelio.saliency.mmdit import encode_concepts

    alone, _ = encode_concepts(tiny_flux, "flux", ["red"], "first_token")
    listed, _ = encode_concepts(tiny_flux, "flux", ["red", "a very long background word"], "first_token")
    torch.testing.assert_close(listed[0], alone[0])
    alone, _ = encode_concepts(tiny_flux, "flux", ["red"], "mean")
    listed, _ = encode_concepts(tiny_flux, "flux", ["red", "a very long background word"], "mean")
    assert not torch.allclose(listed[0], alone[0], atol=1e-4)
