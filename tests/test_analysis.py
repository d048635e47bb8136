"""Feature maps, alignment, latent statistics, the dashboard and steering, on the tiny zoo models."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import sae
from extraction.store import open_store
from revelio.analysis import metrics as M
from revelio.analysis.alignment import METRICS, AlignmentTable
from revelio.analysis.browser import FeatureBrowser
from revelio.analysis.feature_maps import OnTheFly, store_feature_maps, store_samples
from revelio.analysis.stats import latent_stats
from revelio.analysis.steering import Steering, SteeringSpec, box_mask, latent_direction
from revelio.config import load

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread, faster on shared cores


def make_sae(store_path: Path, hook: str, t: int, out: Path, d_sae: int = 96, k: int = 6) -> Path:
    """A small data-initialised SAE (the sae stage's model and file format) on the store's tokens."""
    with open_store(store_path) as st:
        x, _ = st.tokens(hook, t, slice(None))
    model = sae.SparseAutoencoder(x.shape[1], d_sae, k, seed=1)
    model.init_from_data(torch.from_numpy(x))
    return sae.save(model, out, extra={"hook": hook, "timestep": t, "source_store": str(store_path),
                                       "samples": "tokens"})


def encode(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(x)


@pytest.fixture(scope="module")
def sd_sae(sd_store, tmp_path_factory):
    return make_sae(sd_store, "up_blocks.1", 25, tmp_path_factory.mktemp("sae") / "sd_sae")


def test_store_maps_are_per_position_codes_and_match_the_live_pipeline(sd_store, sd_sae, tiny_sd):
    model = sae.load(sd_sae)
    with open_store(sd_store) as st:
        maps = store_feature_maps(st, model, [1, 4])
        assert maps.shape == (2, model.d_sae, 16, 16)
        fmap = st.image_map("up_blocks.1", 25, 4)  # (C, h, w)
        for y, x in [(0, 0), (3, 11), (15, 7)]:
            want = encode(model, torch.from_numpy(fmap[:, y, x])[None])[0].numpy()
            np.testing.assert_allclose(maps[1, :, y, x], want, rtol=1e-5, atol=1e-6)
        assert ((maps > 0).sum(axis=1) <= model.k).all()
        live = OnTheFly.from_store(tiny_sd, model, st).sample_maps(store_samples(st, [1, 4]))
    np.testing.assert_allclose(live, maps, rtol=1e-3, atol=1e-4)


def test_token_store_maps_follow_the_row_major_grid(flux_store, tiny_flux, tmp_path):
    model = sae.load(make_sae(flux_store, "transformer_blocks.3", 250, tmp_path / "flux_sae", d_sae=64, k=4))
    with open_store(flux_store) as st:
        h, w = st.spatial("transformer_blocks.3", 250)
        maps = store_feature_maps(st, model, [2])
        tokens = st.read("transformer_blocks.3", 250, [2])[0]  # (T, C)
        want = encode(model, torch.from_numpy(tokens)).numpy()  # (T, d_sae)
        np.testing.assert_allclose(maps[0].reshape(model.d_sae, h * w).T, want, rtol=1e-5, atol=1e-6)
        live = OnTheFly.from_store(tiny_flux, model, st).sample_maps(store_samples(st, [2]))
    np.testing.assert_allclose(live, maps, rtol=1e-3, atol=1e-4)


def test_flux_concept_attention_alignment_and_token_steering(flux_store, tiny_flux, tmp_path):
    from extraction.adapters import get_adapter
    from extraction.hooks import ActivationCapture
    from revelio.analysis.alignment import SaliencyMaps, align_store

    hook = "transformer_blocks.3"
    model = sae.load(make_sae(flux_store, hook, 250, tmp_path / "flux_sae", d_sae=48, k=4))
    with open_store(flux_store) as st:
        samples = store_samples(st, [0, 1])
        sal = SaliencyMaps(tiny_flux, "auto", t=250, vocabulary=["circle", "square", "background"])
        assert sal.method == "concept_attention"
        table = align_store(st, model, [0, 1], samples, sal, progress=False)
    for c, rec in table.concepts.items():  # ConceptAttention maps every concept of the vocabulary an image holds
        assert rec.n_images["saliency"] == (rec.n_images["mask"] if c in sal.vocabulary else 0)
    ad = get_adapter(tiny_flux)
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = ad.encode_prompts(["a red circle"])

    def run():
        with ActivationCapture(ad, [hook]) as cap:
            cap.reset(ad.n_image_tokens(lat))
            ad.forward(lat, 250, cond)
        return cap.acts[hook]  # (1, 64 tokens, C), row-major 8x8 grid

    x0 = run()
    with Steering(tiny_flux, model, [SteeringSpec(2, 3.0, mask=box_mask([0, 1, 0, 0.5], 8))]):
        x1 = run()
    diff = (x1 - x0).view(1, 8, 8, -1)
    d = latent_direction(model, 2)
    np.testing.assert_allclose(diff[:, :, :4], (3.0 * d).expand(1, 8, 4, -1), atol=1e-5)  # left half of the grid
    assert diff[:, :, 4:].abs().max() == 0


def test_alignment_ranks_the_latent_that_is_the_mask_first_and_compares_with_saliency(tmp_path):
    rng = np.random.default_rng(0)
    table = AlignmentTable(d_sae=5, eval_size=8)
    sal_scores = []
    for i in range(6):
        mask = np.zeros((8, 8), bool)
        mask[i % 4:i % 4 + 4, 2:6] = True
        maps = np.zeros((5, 8, 8), np.float32)
        maps[1] = rng.random((8, 8))  # noise
        maps[2] = mask * 3.0  # fires exactly on the concept
        saliency = mask * 0.6 + rng.random((8, 8)) * 0.5  # a noisy saliency map
        table.add(maps, {"circle": saliency}, {"circle": mask}, ["circle"])
        sal_scores.append(M.scores(saliency, mask.astype(np.float32), mask, 0.4))
    assert table.ranking("circle", "mask", "auroc", top=1) == [2]
    means = table.means("circle", "mask")
    np.testing.assert_allclose(means[:, 2], [1.0, 1.0, 1.0])  # IoU, Pearson, AUROC of a perfect latent
    # silent latents: IoU 0, correlation 0, AUROC 0.5 on every image
    np.testing.assert_allclose(means[:, 0], [0.0, 0.0, 0.5])
    base = table.saliency_baseline("circle")
    for m in METRICS:
        assert base[m] == pytest.approx(np.mean([s[m] for s in sal_scores]))
    b = table.beats("circle", "iou")
    assert b["latent"] == 2 and b["n_select"] == 3 and b["n_eval"] == 3 and b["win_rate"] == 1.0
    assert b["saliency_score"] == pytest.approx(np.mean([s["iou"] for s in sal_scores[1::2]]))
    again = AlignmentTable.load(table.save(tmp_path / "a.npz"))
    assert again.table("auroc") == table.table("auroc") and again.beats("circle") == b


def test_compare_command_writes_tables_with_daam(sd_store, sd_sae, tmp_path):
    from revelio.commands.compare_browse_steer import CompareConfig, compare_cmd

    cfg = load(CompareConfig, overrides={"source": {"sae": str(sd_sae)}, "images": 4, "top": 3,
                                         "out": str(tmp_path / "cmp"), "progress": False})
    res = compare_cmd(cfg)
    rows = list(csv.DictReader(open(res["paths"]["csv"])))
    summary = json.loads(Path(res["paths"]["json"]).read_text())
    assert summary["method"] == "daam" and summary["images"] == 4
    with open_store(sd_store) as st:
        held = {c for s in store_samples(st, range(4)) for c in s.concepts}
    assert set(summary["concepts"]) == held  # every shape present plus background
    table = res["table"]
    for concept, info in summary["concepts"].items():
        mask_rows = [r for r in rows if r["concept"] == concept and r["ranked_by"] == "mask_iou"]
        assert [int(r["latent"]) for r in mask_rows] == info["best_latents"]["mask"]
        best = table.means(concept, "mask")[0]
        assert float(mask_rows[0]["mask_iou"]) == pytest.approx(np.nanmax(best), abs=1e-6)
    # DAAM maps words of the caption only: 'background' has masks but no saliency map
    assert summary["concepts"]["background"]["n_images"]["saliency"] == 0
    assert any(info["saliency_vs_mask"] for info in summary["concepts"].values())
    with pytest.raises(ValueError, match="daam"):
        compare_cmd(load(CompareConfig, overrides={"source": {"sae": str(sd_sae)}, "method": "gradcam"}))

    from revelio.commands.compare_browse_steer import BrowseConfig, browse_cmd

    index = browse_cmd(load(BrowseConfig, overrides={
        "source": {"sae": str(sd_sae)}, "images": 6, "sort": "alignment", "limit": 3, "top_k": 2,
        "alignment": str(res["paths"]["npz"]), "out": str(tmp_path / "dash"), "progress": False}))
    first = next(r["id"] for r in dashboard_rows(index) if r["page"])  # rows in the export's (alignment) order
    iou = np.array([table.means(c, "mask")[0] for c in table.concepts])  # (concepts, d_sae) mean IoU
    assert np.nanmax(iou[:, first]) == pytest.approx(np.nanmax(iou))  # listed first: the best concept IoU of all


def test_latent_stats_against_a_naive_recount(sd_store, sd_sae):
    model = sae.load(sd_sae)
    with open_store(sd_store) as st:
        rows = np.arange(10)
        stats = latent_stats(st, model, rows, batch_size=4, progress=False)
        maps = store_feature_maps(st, model, rows)
        np.testing.assert_array_equal(store_feature_maps(st, model, rows, max_positions=300), maps)  # 1 row/chunk
        labels = st.labels[rows]
    np.testing.assert_allclose(stats.peak, maps.max(axis=(2, 3)), rtol=1e-6)
    np.testing.assert_allclose(stats.frequency, (maps > 0).mean(axis=(0, 2, 3)))
    j = int(np.argmax(stats.frequency))
    top = stats.top_images(j, 3)
    assert list(top) == list(np.argsort(-maps[:, j].max(axis=(1, 2)), kind="stable")[:3])
    labs = labels[top]
    pur, ent = stats.purity_entropy(3)
    assert pur[j] == pytest.approx(np.bincount(labs).max() / 3)
    p = np.bincount(labs) / 3
    assert ent[j] == pytest.approx(-(p[p > 0] * np.log2(p[p > 0])).sum())
    counts, _ = stats.histogram(j, bins=5)
    assert counts.sum() == (stats.peak[:, j] > 0).sum()


def dashboard_rows(index: Path) -> list[dict]:
    """The latent rows the index page renders (its embedded JSON)."""
    text = index.read_text()
    return json.loads(re.search(r"<script type='application/json' id='latents'>(.*?)</script>", text, re.S).group(1))


def test_dashboard_is_self_contained_and_sorted(sd_store, sd_sae, tmp_path):
    model = sae.load(sd_sae)
    with open_store(sd_store) as st:
        b = FeatureBrowser(st, model, rows=range(12), top_k=4, progress=False)
        index = b.export(tmp_path / "dash", by="purity", limit=5)
        order = b.order("purity")
    pages = sorted((tmp_path / "dash").glob("latent_*.html"))
    assert [int(p.stem.split("_")[1]) for p in pages] == sorted(order[:5])
    html = index.read_text()
    rows = dashboard_rows(index)
    assert sorted(r["id"] for r in rows) == list(range(model.d_sae))  # every latent listed, dead ones too
    assert f"{model.d_sae} latents listed" in html and "sorted by <b id='sorted'>purity</b>" in html
    assert [r["id"] for r in rows if r["page"]] == order[:5]  # pages: the first 5 in purity order
    assert "src='http" not in html and "<script src" not in html  # no server, no network
    assert "-0.000" not in html
    j = order[1]
    page = (tmp_path / "dash" / f"latent_{j:05d}.html").read_text()
    n_top = len(b.top_maps(j))  # cached by export; the store is closed
    n_int = sum(len(items) for *_, items in b.interval_maps(j))
    assert 1 <= n_top <= 4 and page.count("data:image/png;base64,") == 2 * (n_top + n_int)  # image + overlay each
    assert f"latent_{order[0]:05d}.html" in page and f"latent_{order[2]:05d}.html" in page  # previous / next
    assert "Activation histogram" in page and ">images</text>" in page  # y axis label
    assert "Activation intervals" in page and "class='cbar'" in page and "0 to its top peak" in page
    assert "Best-matching concepts" in page and "mean IoU vs mask" in page  # shapes has masks
    assert "-0.000" not in page and b.description(j) in page.replace("&#x27;", "'")
    pur = b.purity[order]
    assert all(np.nan_to_num(pur[:-1], nan=-1) >= np.nan_to_num(pur[1:], nan=-1))
    with pytest.raises(ValueError, match="frequency"):
        b.order("loudness")


def test_dashboard_shows_each_latent_across_the_stored_timesteps(sd_store, sd_sae, tmp_path):
    """The per-timestep strip: every timestep the store holds for the SAE's hook (25 and 250 here), each latent's
    mean per-image peak and firing share, against a naive recount with the SAE encoding each image's positions."""
    import torch

    from revelio.analysis.stats import timestep_profile

    model = sae.load(sd_sae)
    with open_store(sd_store) as st:
        prof = timestep_profile(st, model, np.arange(6))
        assert sorted(prof) == st.timesteps(model.cfg["hook"]) == [25, 250]
        for t in (25, 250):
            peaks = []
            for r in range(6):
                x, _ = st.tokens(model.cfg["hook"], t, [r])
                with torch.no_grad():
                    peaks.append(model.encode(torch.from_numpy(np.asarray(x, np.float32))).amax(0).numpy())
            peaks = np.stack(peaks)
            np.testing.assert_allclose(prof[t]["mean_peak"], peaks.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(prof[t]["image_frequency"], (peaks > 0).mean(0))
        b = FeatureBrowser(st, model, rows=range(6), top_k=3, progress=False, align=False)
        j = b.order("frequency")[0]
        page = b.latent_html(j)
    assert "Across timesteps" in page and ">t=25</text>" in page and ">t=250</text>" in page
    own = model.cfg["timestep"]
    assert f"t={own}: mean peak {float(prof[own]['mean_peak'][j]):.4g}" in page


def test_mask_purity_counts_peaks_inside_object_masks(sd_store, sd_sae):
    """Purity per object mask, against a direct recount: the share of top images whose peak position lies in
    the mask of the latent's commonest concept there (not the largest object's label)."""
    model = sae.load(sd_sae)
    with open_store(sd_store) as st:
        b = FeatureBrowser(st, model, rows=range(12), top_k=4, progress=False, align=False)
        for j in b.order("frequency")[:6]:
            top = b.top_maps(j)
            counts = {}
            for row, heat, _ in top:
                smp = store_samples(st, [row])[0]
                y, x = np.unravel_index(np.argmax(heat), heat.shape)
                scale = smp.image.size[0] // heat.shape[0]
                for c, m in smp.masks.items():
                    if " " not in c and m[y * scale + scale // 2, x * scale + scale // 2]:
                        counts[c] = counts.get(c, 0) + 1
            assert b.purity[j] == pytest.approx(max(counts.values()) / len(top))
            assert counts[b.purity_concept[j]] == max(counts.values())
    assert b.purity_kind == "mask"


def test_steering_adds_and_removes_the_decoder_direction_where_and_when_asked(sd_sae, tiny_sd):
    from extraction.adapters import get_adapter
    from extraction.hooks import ActivationCapture

    model = sae.load(sd_sae)
    ad = get_adapter(tiny_sd)
    g = torch.Generator().manual_seed(0)
    lat, cond = torch.randn(2, 4, 16, 16, generator=g), ad.encode_prompts(["a red circle", "a blue star"])

    def run(specs=None):
        with ActivationCapture(ad, ["up_blocks.1"]) as cap:  # registered after the steering hook: sees its edit
            cap.reset(None)
            out = ad.forward(lat, 25, cond)
        return cap.acts["up_blocks.1"], out

    def steered(specs):
        with Steering(tiny_sd, model, specs):
            return run()

    x0, out0 = run()
    d = latent_direction(model, 3)
    np.testing.assert_allclose(d.numpy(), (model.W_dec[3] / model.norm_scale).detach().numpy(), rtol=1e-5, atol=1e-7)
    x1, out1 = steered([SteeringSpec(3, 2.5, mask=box_mask([0, 0.5, 0, 1], 16))])
    np.testing.assert_allclose((x1 - x0)[:, :, :8], (2.5 * d)[None, :, None, None].expand(2, -1, 8, 16), atol=1e-5)
    assert (x1 - x0)[:, :, 8:].abs().max() == 0 and not torch.equal(out0, out1)
    x2, _ = steered([SteeringSpec(3, 1.0, mode="remove")])
    z = encode(model, x0.permute(0, 2, 3, 1).reshape(-1, x0.shape[1]))[:, 3].view(2, 16, 16)
    assert z.max() > 0
    np.testing.assert_allclose(x0 - x2, z[:, None] * d[None, :, None, None], atol=1e-5)
    x3, out3 = steered([SteeringSpec(3, 2.5, steps=(1, 5))])  # this single call is step 0: untouched
    assert torch.equal(x3, x0) and torch.equal(out3, out0)
    with pytest.raises(ValueError, match="add, remove"):
        SteeringSpec(3, mode="boost").check(model.d_sae)
    with pytest.raises(ValueError, match="top, bottom"):
        box_mask([0.5, 0.2, 0, 1])


def test_steering_counts_denoising_steps_and_steers_both_cfg_passes_on_flux_true_cfg(tiny_flux):
    """tiny-flux under true CFG calls its transformer twice a step (conditional, then unconditional): steps=(1, 3)
    steers exactly scheduler steps 1 and 2, both passes of each, and nothing else."""
    from extraction.adapters import get_adapter
    from revelio.analysis.steering import generate

    ad = get_adapter(tiny_flux)  # tiny-flux has no guidance embedding: true CFG, two calls a step
    assert ad.guidance == "true_cfg" and ad.denoiser_calls_per_step(ad.generation_kwargs(4.0)) == 2
    assert ad.denoiser_calls_per_step(ad.generation_kwargs(1.0)) == 1
    hook = "transformer_blocks.1"
    width, tokens = tiny_flux.transformer.inner_dim, (64 // (2 * tiny_flux.vae_scale_factor)) ** 2  # of a 64-px image
    model = sae.SparseAutoencoder(width, 32, 4, seed=0)
    module = dict(tiny_flux.transformer.named_modules())[hook]

    def run(scale, guidance=4.0):
        steering = Steering(tiny_flux, model, [SteeringSpec(2, scale, steps=(1, 3))], hook=hook)
        seen = []  # (step, image tokens after the steering hook) at every firing of the hooked block
        with steering:
            h = module.register_forward_hook(lambda m, a, out: seen.append((steering.step, out[1].detach().clone())))
            try:
                generate(tiny_flux, "a red circle", seed=0, steps=4, guidance_scale=guidance, size=64)
            finally:
                h.remove()
        assert "step" not in vars(tiny_flux.scheduler)  # the scheduler is itself again
        return steering, seen

    base, before = run(0.0)
    steering, after = run(3.0)
    assert dict(steering.calls_per_step) == {0: 2, 1: 2, 2: 2, 3: 2}  # 4 steps x (cond + uncond)
    assert dict(steering.steered_per_step) == {1: 2, 2: 2}  # only steps 1 and 2, both passes
    assert [s for s, _ in after] == [0, 0, 1, 1, 2, 2, 3, 3]
    d = latent_direction(model, 2)
    assert torch.equal(after[0][1], before[0][1]) and torch.equal(after[1][1], before[1][1])  # step 0 untouched
    for i in (2, 3):  # step 1, conditional and unconditional: its input is unchanged, its output moved by 3 d
        np.testing.assert_allclose((after[i][1] - before[i][1]).numpy(), (3.0 * d).expand(1, tokens, -1).numpy(),
                                   atol=1e-4)
    single, _ = run(3.0, guidance=1.0)  # no CFG: one call a step, the same steps steered
    assert dict(single.calls_per_step) == {0: 1, 1: 1, 2: 1, 3: 1} and dict(single.steered_per_step) == {1: 1, 2: 1}


def test_steer_command_steers_exactly_the_steps_it_is_told_on_flux_true_cfg(flux_store, tmp_path, capsys):
    """`revelio steer --steps '[1,3]'` on tiny-flux under true CFG (two transformer calls a step): of 4 denoising
    steps exactly 1 and 2 are steered, both passes of each; a window after the last step is refused."""
    from revelio.cli import run
    from revelio.config import ConfigError

    path = make_sae(flux_store, "transformer_blocks.3", 250, tmp_path / "flux_sae", d_sae=64, k=4)
    base = ["steer", "--source.sae", str(path), "--latent", "2", "--scale", "8", "--inference_steps", "4",
            "--guidance_scale", "4", "--size", "64", "--prompt", "a red circle"]
    res = run(base + ["--steps", "[1, 3]", "--out", str(tmp_path / "s.png")])
    assert res["calls_per_step"] == {0: 2, 1: 2, 2: 2, 3: 2}  # true CFG: conditional + unconditional a step
    assert res["steered_per_step"] == {1: 2, 2: 2}  # denoising steps 1 and 2, both passes, nothing else
    assert res["mean_abs_diff"] > 0 and "denoising steps [1, 2] of 4" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="start after the generation's last denoising step"):
        run(base + ["--steps", "[4, 6]", "--out", str(tmp_path / "t.png")])


def test_steer_command_before_after(sd_sae, tmp_path):
    from revelio.commands.compare_browse_steer import SteerConfig, steer_cmd

    res = steer_cmd(load(SteerConfig, overrides={"source": {"sae": str(sd_sae)}, "latent": 3, "scale": 40.0,
                                                 "inference_steps": 2, "prompt": "a red circle",
                                                 "out": str(tmp_path / "s.png")}))
    assert res["path"].exists() and res["before"].size == res["after"].size
    assert res["mean_abs_diff"] > 0.5  # the same seed: every change is the steering's
