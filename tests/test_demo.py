"""The demo's whole pipeline (extract -> SAE -> probes -> saliency/segment -> compare -> browse -> steer) at a small size."""

import contextlib
import csv
import io
import json

import h5py
import pytest

import sae
from extraction.store import open_store
from revelio.cli import run

SMALL = ["--images", "24", "--sae_steps", "20", "--segment_images", "2", "--compare_images", "6",
         "--saliency_steps", "2", "--probe_seeds", "[0]", "--segment_seeds", "[0]", "--progress", "false",
         "--erase_latents", "1", "--erase_steps", "2"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = run(["demo", "--out", str(out), *SMALL])
    res["printed"] = buf.getvalue()
    return out, res


@pytest.mark.slow  # every stage of the demo end to end, even at this small size
def test_demo_writes_every_stage(demo_run, capsys):
    out, res = demo_run
    p, f = res["paths"], res["figures"]
    assert list(res["seconds"]) == ["extract", "sae", "probe", "saliency", "segment", "compare", "browse", "steer",
                                    "erase"]

    for model, hooks in (("tiny-sd", 4), ("tiny-flux", 3)):
        with open_store(p[f"store_{model}"]) as st:
            assert st.attrs["complete"] and int(st.done.sum()) == 24
            assert len(st.hooks) == hooks and st.timesteps(st.hooks[0]) == [25, 250, 500]
        m = sae.load(p[f"sae_{model}"])
        assert m.cfg["samples"] == "tokens" and m.cfg["timestep"] == 250 and m.k == 8
        assert f[f"sae_{model}"]["l0"] == pytest.approx(8.0)
        # each SAE has its own offline wandb run (a second fit in one process must not reuse the first's)
        assert len(list((out / "sae" / model / "wandb").glob("offline-run-*"))) == 1
        rows = list(csv.DictReader(open(out / "probes" / model / "probes.csv")))
        assert {r["features"] for r in rows} >= {"raw", "pixels", "mean_colour", "histogram", "random", "sae"}
        assert {r["label"] for r in rows} == {"colour", "shape"}  # both attributes of the same images
        for lab in ("colour", "shape"):
            s = f[f"probe_{model}"][lab]
            assert set(s["baselines"]) == {"pixels", "mean_colour", "histogram"}
            assert s["best_layer_wins"] == (s["best_layer_accuracy"] > max(s["baselines"].values()))
            mono = f[f"monosemanticity_{model}"][lab]
            assert set(mono) == {"sae", "neurons"} and 0 < mono["neurons"]["mean_purity"] <= 1
        assert (out / "probes" / model / "heatmap.png").stat().st_size > 5000
        assert (out / "probe_report" / model / "summary.csv").exists()
        comp = json.loads((out / "compare" / model / "alignment.json").read_text())
        assert comp["images"] == 6 and comp["concepts"]
        index = (out / "dashboard" / model / "index.html").read_text()
        assert "latent_" in index and len(list((out / "dashboard" / model).glob("latent_*.html"))) >= 1

    assert len(p["saliency_daam"]) == 2 and len(p["saliency_concept_attention"]) == 2
    for lab, table in (("colour", out / "segment" / "table.md"),
                       ("shape", out / "segment" / "shape_words" / "table.md")):
        text = table.read_text()
        assert f"{lab} words" in text and "mIoU - prior" in text
        for method in ("concept_attention", "cross_attention", "daam", "center_prior"):
            assert method in text
            assert 0 <= f["segmentation"][lab][method]["miou"] <= 100
    assert len(list((out / "steer").glob("*.png"))) == 1 and f["steer"]["mean_abs_pixel_change"] > 0
    assert set(f["erase"]) == {"concept", "sae", "random", "negative_prompt"} and f["erase"]["sae"]["n"] == 1
    assert (out / "erase" / "table.md").exists() and f["erase"]["sae"]["pixel_change_without"] >= 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["figures"]["steer"]["latent"] == f["steer"]["latent"]
    md = (out / "summary.md").read_text()
    assert "held-out FVU" in md and "mIoU" in md
    # every headline figure has its baseline beside it, for both labels / word types
    for text in (md, res["printed"]):
        for needle in ("tiny-sd colour: best layer", "tiny-flux shape: best layer", "flat pixels", "mean colour",
                       "colour histogram", "tiny-sd shape purity: SAE latents", "neurons", "labels shuffled",
                       "colour words mIoU/mAP", "shape words mIoU/mAP", "centre prior"):
            assert needle in text, needle


@pytest.mark.slow
def test_demo_rerun_resumes_the_finished_stores(demo_run, capsys):
    out, _ = demo_run
    stamp = {m: (out / "extract" / f"{m}.h5").stat().st_mtime_ns for m in ("tiny-sd", "tiny-flux")}
    res = run(["demo", "--out", str(out), *SMALL, "--steps", "[extract]"])
    assert list(res["seconds"]) == ["extract"]
    for m, t in stamp.items():
        assert (out / "extract" / f"{m}.h5").stat().st_mtime_ns == t  # finished store left as it was
        with h5py.File(out / "extract" / f"{m}.h5", "r") as fh:
            assert fh["images/done"][:].all()


def test_demo_rejects_unknown_stage_and_timestep(tmp_path):
    with pytest.raises(ValueError, match="shape, colour"):
        run(["demo", "--out", str(tmp_path), "--label", "size"])
    with pytest.raises(ValueError, match="valid: extract, sae, probe"):
        run(["demo", "--out", str(tmp_path), "--steps", "[extrct]"])
    with pytest.raises(ValueError, match="sae_timestep 999"):
        run(["demo", "--out", str(tmp_path), "--sae_timestep", "999"])


@pytest.mark.slow
def test_demo_headline_numbers_repeat_run_to_run(demo_run, tmp_path):
    """Same machine, same thread count: a second run of the SAE and compare stages on the same stores gives the
    same headline numbers (held-out FVU, dead fraction, 'best latent beats saliency for n of m') and tables."""
    import shutil

    out, res = demo_run
    again = tmp_path / "again"
    shutil.copytree(out / "extract", again / "extract")
    res2 = run(["demo", "--out", str(again), *SMALL, "--steps", "[sae,compare]"])
    for model in ("tiny-sd", "tiny-flux"):
        assert res2["figures"][f"sae_{model}"] == res["figures"][f"sae_{model}"]
        assert res2["figures"][f"compare_{model}"] == res["figures"][f"compare_{model}"]
        first = json.loads((out / "compare" / model / "alignment.json").read_text())
        second = json.loads((again / "compare" / model / "alignment.json").read_text())
        assert json.dumps(second["concepts"], sort_keys=True) == json.dumps(first["concepts"], sort_keys=True)
