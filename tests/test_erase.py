"""Concept erasure: the latent-selection rule, the edit and its step window, and the judged scores."""

import json

import numpy as np
import pytest
import torch

import sae
from extraction.store import open_store
from revelio.analysis.erase import (Erasure, concept_scores, default_prompts, edit_reference, erasure_scores,
                                    generate_images, has_word, random_latents, store_concept_stats, top_latents)
from revelio.cli import main
from revelio.config import load

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_sae(store_path, hook, t, out, d_sae=64, k=4):
    with open_store(store_path) as st:
        x, _ = st.tokens(hook, t, slice(None))
    model = sae.SparseAutoencoder(x.shape[1], d_sae, k, seed=1)
    model.init_from_data(torch.from_numpy(x))
    return sae.save(model, out, extra={"hook": hook, "timestep": t, "source_store": str(store_path),
                                       "samples": "tokens"})


@pytest.fixture(scope="module")
def sd_sae(sd_store, tmp_path_factory):
    return make_sae(sd_store, "up_blocks.1", 250, tmp_path_factory.mktemp("erase_sae") / "sd")


def naive_scores(acts, flags):
    """SAeUron's score written out latent by latent."""
    w = [a for a, f in zip(acts, flags) if f]
    o = [a for a, f in zip(acts, flags) if not f]
    mu_w = [sum(a[j] for a in w) / len(w) for j in range(acts.shape[1])]
    mu_o = [sum(a[j] for a in o) / len(o) for j in range(acts.shape[1])]
    return np.array([mu_w[j] / sum(mu_w) - mu_o[j] / sum(mu_o) for j in range(acts.shape[1])])


def test_selection_finds_the_planted_latent():
    rng = np.random.default_rng(0)
    n, d = 400, 32
    flags = rng.random(n) < 0.3
    acts = rng.exponential(1.0, (n, d)) * (rng.random((n, d)) < 0.3)  # every latent fires on both sides
    acts[:, 5] *= 3.0  # a loud latent unrelated to the concept
    acts[:, 7] = np.where(flags, rng.uniform(0.5, 1.5, n), 0.0)  # fires only with the concept
    acts[:, 11] = np.where(flags, 0.0, 0.5)  # fires only without it: scored lowest
    s = concept_scores(acts, flags)
    np.testing.assert_allclose(s, naive_scores(acts, flags), rtol=1e-10, atol=1e-12)
    assert top_latents(s, 1) == [7] and int(np.argmin(s)) == 11
    assert top_latents(s, 0) == [] and len(top_latents(s, 3)) == 3
    with pytest.raises(ValueError, match="with and without"):
        concept_scores(acts, np.ones(n, bool))
    r = random_latents(4, acts.max(0) > 0, exclude=[7], seed=0)
    assert len(set(r)) == 4 and 7 not in r and r == random_latents(4, acts.max(0) > 0, exclude=[7], seed=0)


def test_concept_words_and_default_prompts():
    assert has_word("a purple diamond and a blue square", "blue") and has_word("A Blue star", "blue")
    assert not has_word("a bluebird", "blue") and has_word("a red circle", "red circle")
    w, o = default_prompts("blue")
    assert all("blue" in p for p in w) and not any(has_word(p, "blue") for p in o) and len(w) == 6
    w, o = default_prompts("star")
    assert all(p.endswith(" star") for p in w) and not any(has_word(p, "star") for p in o)
    with pytest.raises(ValueError, match="with_prompts"):
        default_prompts("dog")


def test_store_stats_plant_on_a_real_store(sd_store, sd_sae):
    """On the real store: the selection reads captions and mean codes; an SAE latent planted on 'blue' wins."""
    model = sae.load(sd_sae)
    with open_store(sd_store) as st:
        rows = np.flatnonzero(st.done)
        stats = store_concept_stats(st, model, "blue", rows)
        caps = st.captions
        x, _ = st.tokens("up_blocks.1", 250, rows[:1])
    assert stats.with_concept.tolist() == ["blue" in str(caps[r]).split() for r in rows]
    assert 0 < stats.with_concept.sum() < len(rows)
    with torch.no_grad():
        want = model.encode(torch.from_numpy(x)).mean(0).numpy()
    np.testing.assert_allclose(stats.acts[0], want, rtol=1e-5, atol=1e-6)
    planted = stats.acts.copy()
    planted[:, 9] = np.where(stats.with_concept, 0.3, 0.0)
    assert top_latents(concept_scores(planted, stats.with_concept), 1) == [9]


def test_edit_is_x_plus_decoded_change_and_leaves_other_layers(sd_sae, tiny_sd):
    from extraction.adapters import get_adapter
    from extraction.hooks import ActivationCapture

    model = sae.load(sd_sae)
    ad = get_adapter(tiny_sd)
    g = torch.Generator().manual_seed(0)
    lat, cond = torch.randn(2, 4, 16, 16, generator=g), ad.encode_prompts(["a blue circle", "a red star"])

    def run(erasure=None):
        if erasure is not None:
            erasure.__enter__()
        try:
            with ActivationCapture(ad, ["mid_block", "up_blocks.1"]) as cap:  # after the edit hook: sees it
                cap.reset(None)
                out = ad.forward(lat, 250, cond)
        finally:
            if erasure is not None:
                erasure.__exit__()
        return cap.acts["mid_block"].clone(), cap.acts["up_blocks.1"].clone(), out

    m0, x0, out0 = run()
    tok = x0.permute(0, 2, 3, 1).reshape(-1, x0.shape[1])
    with torch.no_grad():
        live = torch.nonzero(model.encode(tok).sum(0)).flatten()[:3].tolist()
    for strength in (1.0, 3.0):
        e = Erasure(tiny_sd, model, live, strength)
        m1, x1, out1 = run(e)
        want = edit_reference(model, tok, live, strength).view(2, 16, 16, -1).permute(0, 3, 1, 2)
        np.testing.assert_allclose(x1.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
        assert torch.equal(m1, m0) and not torch.equal(out1, out0) and e.edits == 1  # upstream layer untouched
    # strength 1 sets the chosen codes to 0 in the SAE's own reading of the reconstruction
    with torch.no_grad():
        z = model.encode(tok)
        z_after = z.clone()
        z_after[:, live] = 0
        np.testing.assert_allclose(model.decode(z_after).numpy(),
                                   (model.decode(z) - z[:, live] @ (model.W_dec[live] / model.norm_scale)).numpy(),
                                   rtol=1e-4, atol=1e-5)
    for nothing in (Erasure(tiny_sd, model, live, 0.0), Erasure(tiny_sd, model, [], 2.0)):
        m2, x2, out2 = run(nothing)
        assert torch.equal(x2, x0) and torch.equal(out2, out0) and nothing.edits == 0
    with pytest.raises(ValueError, match="out of range"):
        Erasure(tiny_sd, model, [model.d_sae], 1.0)


def test_strength_zero_generations_are_bit_identical_and_the_window_counts_steps(sd_sae, tiny_sd):
    model = sae.load(sd_sae)
    prompts, seeds = ["a blue circle", "a red square"], [0, 1]
    base = generate_images(tiny_sd, prompts, seeds, steps=6, guidance_scale=4.0)
    for e in (Erasure(tiny_sd, model, [1, 2, 3], 0.0), Erasure(tiny_sd, model, [], 5.0)):
        with e:
            same = generate_images(tiny_sd, prompts, seeds, steps=6, guidance_scale=4.0)
        assert all(np.array_equal(a, b) for a, b in zip(base, same)) and e.calls == 6 and e.edits == 0
    e = Erasure(tiny_sd, model, list(range(model.d_sae)), 2.0, steps=(2, 5))
    with e:
        edited = generate_images(tiny_sd, prompts, seeds, steps=6, guidance_scale=4.0)
    assert e.calls == 6 and e.edited_steps == [2, 3, 4]  # one batched (uncond + cond) UNet call per step
    assert any(not np.array_equal(a, b) for a, b in zip(base, edited))


def test_flux_true_cfg_window_counts_steps_not_transformer_calls(flux_store, tiny_flux, tmp_path):
    model = sae.load(make_sae(flux_store, "transformer_blocks.3", 250, tmp_path / "flux_sae"))
    e = Erasure(tiny_flux, model, list(range(16)), 2.0, steps=(1, 3))
    with e:
        edited = generate_images(tiny_flux, ["a blue circle"], [0], steps=4, guidance_scale=4.0)
    assert e.calls == 8 and e.edited_steps == [1, 1, 2, 2]  # true CFG: two calls a step, both edited
    base = generate_images(tiny_flux, ["a blue circle"], [0], steps=4, guidance_scale=4.0)
    assert not np.array_equal(base[0], edited[0])
    with Erasure(tiny_flux, model, list(range(16)), 0.0):
        same = generate_images(tiny_flux, ["a blue circle"], [0], steps=4, guidance_scale=4.0)
    assert np.array_equal(base[0], same[0])


def test_erasure_scores_match_a_hand_count_of_judged_images():
    from revelio.zoo.quality import ShapesJudge, real_images

    judge = ShapesJudge.fit(n_train=120, n_val=30, seed=0)
    images, colours, shapes = real_images(40, seed=5)
    pick = {c: next(im for im, cc in zip(images, colours) if cc == c) for c in ("blue", "red", "green")}
    blue2 = [im for im, cc in zip(images, colours) if cc == "blue"][1]
    blank = np.full((64, 64, 3), 128, np.uint8)  # no vivid object
    base_with, edit_with = [pick["blue"], blue2, pick["blue"], blue2], [pick["blue"], pick["red"], blank, blue2]
    base_without, edit_without = [pick["red"], pick["green"], pick["red"]], [pick["red"], blank, pick["blue"]]
    lab = {k: [judge.judge(im) for im in v] for k, v in
           dict(bw=base_with, ew=edit_with, bo=base_without, eo=edit_without).items()}
    assert [c for c, _ in lab["ew"]] == ["blue", "red", None, "blue"]  # what the judge reads, as seen by eye
    s = erasure_scores("blue", lab["bw"], lab["ew"], lab["bo"], lab["eo"])
    # by hand: 4 with-prompt images all show blue unedited; after the edit 2 (red, blank) no longer do
    assert s["n_shown"] == 4 and s["erasure"] == pytest.approx(2 / 4) and s["erasure_all"] == pytest.approx(2 / 4)
    # without: only the first keeps its (colour, shape); colours kept: 1 of 3 (blank has none, red -> blue)
    assert s["retention"] == pytest.approx(1 / 3) and s["retention_attr"] == pytest.approx(1 / 3)
    # objects found in 5 of the 7 edited images (the two blanks have none); all 7 unedited ones have one
    assert s["fidelity"] == pytest.approx(5 / 7) and s["fidelity_base"] == 1.0
    # an unedited image without blue does not count towards erasure
    s2 = erasure_scores("blue", [lab["bo"][0]] + lab["bw"][1:], lab["ew"], lab["bo"], lab["bo"])
    assert s2["n_shown"] == 3 and s2["erasure"] == pytest.approx(2 / 3) and s2["retention"] == 1.0
    assert erasure_scores("dog", lab["bw"], lab["ew"], lab["bo"], lab["eo"])["erasure"] is None


def test_erase_command_writes_table_curve_and_baselines(sd_sae, tmp_path):
    from revelio.commands.erase import EraseConfig, erase_cmd

    out = tmp_path / "erase"
    res = erase_cmd(load(EraseConfig, overrides={
        "source": {"sae": str(sd_sae)}, "concept": "blue", "images": 24, "n_latents": [2], "strengths": [1.0, 4.0],
        "with_prompts": ["a blue circle"], "without_prompts": ["a red square"], "seeds": [0],
        "inference_steps": 2, "judge_images": 30, "out": str(out)}))
    rows = res["rows"]
    assert [(r["method"], r["strength"]) for r in rows] == [("sae", 1.0), ("random", 1.0), ("sae", 4.0),
                                                             ("random", 4.0), ("negative_prompt", None)]
    sel = res["summary"]["selected_latents"]
    assert rows[0]["latents"] == sel[:2] and not set(rows[1]["latents"]) & set(sel[:2])
    assert rows[2]["pixel_change_with"] > 0 and rows[-1]["pixel_change_with"] > 0
    for r in rows:
        assert 0 <= r["fidelity"] <= 1 and r["n_with"] == 1 and r["n_without"] == 1
    saved = json.loads((out / "erase.json").read_text())
    assert saved["rows"][0]["latents"] == sel[:2] and "| sae | 2 | 4 |" in (out / "table.md").read_text()
    assert (out / "curve.png").stat().st_size > 5000 and (out / "examples.png").exists()


def test_erase_cli_bad_input_is_one_line(sd_sae, tmp_path, capsys):
    assert main(["erase", "--source.sae", str(sd_sae), "--concept", "dog", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "with_prompts" in err[0]
    assert main(["erase", "--source.sae", str(sd_sae), "--concept", "dog", "--with_prompts", "[a dog]",
                 "--without_prompts", "[a cat]", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0 of 24" in err[0]
    assert main(["erase", "--source.sae", str(sd_sae), "--window", "[3,1]", "--out", str(tmp_path / "e")]) == 2
    assert "window" in capsys.readouterr().err
