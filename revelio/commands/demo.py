"""``revelio demo``: the whole pipeline on the embedded tiny models, ending with where each result is.

Every stage runs through the same ``revelio`` subcommand a user would type (each is printed
before it runs), on the shipped trained ``tiny-sd`` (UNet) and ``tiny-flux`` (MM-DiT) and the
``shapes`` world:

1. ``extract``   activations of both models at a few hooks and timesteps -> HDF5 stores
2. ``sae fit``   a TopK SAE per model on per-position tokens of one hook/timestep
3. ``probe``     linear probes on every hook x timestep (+ SAE codes, pixel/random baselines)
   ``probe report``  monosemanticity of each SAE's latents
4. ``saliency``  DAAM (tiny-sd) and ConceptAttention (tiny-flux) maps of generated images
   ``segment``   zero-shot segmentation table, methods side by side
5. ``compare``   SAE latents ranked against saliency maps and masks
   ``browse``    the static HTML feature dashboard
   ``steer``     before/after generation with the best-aligned latent
   ``erase``     erase "blue" from tiny-sd by ablating its top SAE latents; judged erasure and retention
                 beside random latents and the negative prompt

Extraction resumes a finished or interrupted store with the same config, so a second
``make demo`` skips it. ``summary.json`` and ``summary.md`` in the output folder hold the
headline figures and the paths.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cli import command
from ..config import field

# One SAE site per model: a hook whose per-position features carry the layout of the image.
MODELS = {
    "tiny-sd": {"hooks": ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"], "sae_hook": "up_blocks.1"},
    "tiny-flux": {"hooks": ["transformer_blocks.1", "transformer_blocks.3", "single_transformer_blocks.1"],
                  "sae_hook": "transformer_blocks.3"},
}


@dataclass
class DemoConfig:
    out: str = field("runs/demo", help="folder for every result of the demo")
    label: str = field("colour", help="what probes, compare and segmentation score: the largest object's colour "
                                      "(what the zoo models learned) or its shape")
    images: int = field(1024, min=1, help="shapes images extracted per model (probes and SAEs train on them)")
    timesteps: list[int] = field(default_factory=lambda: [25, 250, 500], nonempty=True, min=0, max=999, help="noise timesteps extracted")
    sae_timestep: int = field(250, min=0, max=999, help="timestep the SAEs are trained on (one of timesteps)")
    sae_steps: int = field(2000, min=1, help="SAE training steps")
    sae_expansion: int = field(8, min=1, help="SAE width / input width")
    sae_k: int = field(8, min=1, help="active latents per token")
    probe_seeds: list[int] = field(default_factory=lambda: [0, 1, 2], nonempty=True, help="probe split seeds")
    segment_images: int = field(64, min=1, help="held-out shapes images in the segmentation table")
    segment_seeds: list[int] = field(default_factory=lambda: [0, 1, 2], nonempty=True, help="noise seeds of the segmentation maps")
    compare_images: int = field(128, min=1, help="store images scored by compare and shown by browse")
    saliency_steps: int = field(20, min=1, help="denoising steps of the generated saliency examples")
    steer_scale: float = field(30.0, help="steer: coefficient of the added decoder direction, "
                                          "in units of the latent's activation")
    erase_concept: str = field("blue", help="erase: the colour erased from tiny-sd (blue: the best-learned colour)")
    erase_latents: int = field(2, min=1, help="erase: top-scored SAE latents edited")
    erase_strength: float = field(3.0, min=0, help="erase: the latents' codes are scaled by (1 - strength)")
    erase_steps: int = field(8, min=1, help="erase: denoising steps of its generations")
    seed: int = field(0, help="seed for data, noise and training")
    steps: list[str] | None = field(None, help="run only these stages (extract, sae, probe, saliency, segment, "
                                               "compare, browse, steer, erase); null: all")
    progress: bool = field(True, help="show progress bars")


STAGES = ["extract", "sae", "probe", "saliency", "segment", "compare", "browse", "steer", "erase"]


def _revelio(args: list[str]) -> Any:
    """Run ``revelio <args>`` in this process, printing the command line first."""
    from ..cli import run

    print(f"\n$ revelio {shlex.join(args)}", flush=True)
    return run(args)


def _list(values: list[Any]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def _best(records: list[dict[str, Any]], features: str) -> dict[str, Any] | None:
    rows = [r for r in records if r["features"] == features and r["probe"] == "linear"]
    return max(rows, key=lambda r: r["accuracy_mean"]) if rows else None


@command("demo", DemoConfig)
def demo_cmd(cfg: DemoConfig) -> dict[str, Any]:
    """Run the whole pipeline on the embedded tiny models and the shapes world; print where each result is."""
    from ..config import ConfigError
    from ..datasets import Shapes
    from ..viz import sample_grid
    from ..zoo import shipped_path

    steps = list(cfg.steps or STAGES)
    bad = [s for s in steps if s not in STAGES]
    if bad:
        raise ConfigError(f"unknown demo stage(s) {bad}; valid: {', '.join(STAGES)}")
    if cfg.sae_timestep not in cfg.timesteps:
        raise ConfigError(f"sae_timestep {cfg.sae_timestep} is not among the extracted timesteps {cfg.timesteps}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = str(cfg.progress).lower()
    start = time.perf_counter()
    timings: dict[str, float] = {}
    res: dict[str, Any] = {"paths": {}, "figures": {}}
    if set(steps) != set(STAGES) and (out / "summary.json").exists():
        # a partial rerun (--steps) updates the stages it runs and keeps the others' results
        old = json.loads((out / "summary.json").read_text())
        res["paths"].update(old.get("paths", {}))
        res["figures"].update(old.get("figures", {}))
    paths, figs = res["paths"], res["figures"]

    ds = Shapes(size=64, count=cfg.images, seed=cfg.seed, label=cfg.label)
    paths["data_preview"] = str(sample_grid(list(ds.iter_samples(list(range(16)))), out / "shapes.png",
                                            show_masks=True))
    print(f"data: shapes world, {len(ds)} images, label = {cfg.label} of the largest object, {len(ds.class_names)} "
          f"classes ({', '.join(ds.class_names)}); "
          f"preview {paths['data_preview']}")
    for name in MODELS:
        kind = "trained weights shipped with the package" if shipped_path(name) else "RANDOM INIT (no shipped weights)"
        print(f"model: {name}: {kind}")

    stores = {m: out / "extract" / f"{m}.h5" for m in MODELS}
    saes = {m: out / "sae" / m for m in MODELS}

    def stage(name: str):
        def wrap(fn):
            if name in steps:
                t0 = time.perf_counter()
                fn()
                timings[name] = round(time.perf_counter() - t0, 1)
            return fn
        return wrap

    @stage("extract")
    def _extract():
        for m, spec in MODELS.items():
            s = _revelio(["extract", "--model.id", m, "--data.name", "shapes", "--data.size", "64",
                          "--data.count", str(cfg.images), "--data.seed", str(cfg.seed), "--data.label", cfg.label,
                          "--hooks", _list(spec["hooks"]), "--timesteps", _list(cfg.timesteps),
                          "--batch_size", "32", "--storage_dtype", "float16", "--seed", str(cfg.seed),
                          "--out", str(stores[m]), "--progress", progress])
            paths[f"store_{m}"] = str(stores[m])
            figs[f"store_{m}_mb"] = round(s.bytes / 1e6, 1) if s is not None else None

    @stage("sae")
    def _sae():
        for m, spec in MODELS.items():
            r = _revelio(["sae", "fit", "--data.store", str(stores[m]), "--data.hook", spec["sae_hook"],
                          "--data.timestep", str(cfg.sae_timestep), "--data.samples", "tokens",
                          "--data.batch_size", "512", "--model.expansion", str(cfg.sae_expansion),
                          "--model.k", str(cfg.sae_k), "--model.hist_every", str(max(50, cfg.sae_steps // 4)),
                          "--trainer.max_steps", str(cfg.sae_steps),
                          "--trainer.log_every_n_steps", str(max(1, min(25, cfg.sae_steps // 4))),
                          "--trainer.enable_progress_bar", progress,
                          "--logging.checkpoint_every_n_steps", str(cfg.sae_steps),
                          "--logging.name", f"demo-{m}", "--out", str(saes[m]), "--seed", str(cfg.seed)])
            val = r.get("val", {})
            paths[f"sae_{m}"] = str(r["sae"])
            figs[f"sae_{m}"] = {"hook": spec["sae_hook"], "timestep": cfg.sae_timestep,
                                "fvu": val.get("fvu"), "l0": val.get("l0"), "dead_fraction": val.get("dead_fraction")}

    labels = [cfg.label] + [lab for lab in ("colour", "shape") if lab != cfg.label]  # the demo's label first

    @stage("probe")
    def _probe():
        for m in MODELS:
            r = _revelio(["probe", "--store", str(stores[m]), "--sae", _list([saes[m] / "sae"]),
                          "--labels", _list(labels),
                          "--seeds", _list(cfg.probe_seeds), "--cv_folds", "3", "--Cs", "[0.01,0.1,1.0,10.0]",
                          "--ks", "[1,4,16]", "--out", str(out / "probes" / m), "--progress", progress])
            paths[f"probes_{m}"] = r["files"]["heatmap"]
            per_label = {}
            for lab in labels:
                recs = [x for x in r["records"] if x["label"] == lab]
                v = r["verdicts"][lab]
                sae_row = _best(recs, "sae")
                per_label[lab] = {
                    "best_layer": f"{v['best']['hook']} t={v['best']['timestep']}",
                    "best_layer_accuracy": v["best"]["accuracy"], "chance": v["best"]["chance"],
                    "sae_codes_accuracy": sae_row["accuracy_mean"] if sae_row else None,
                    "baselines": {k: b["accuracy"] for k, b in v["baselines"].items()},
                    "strongest_baseline": v["strongest"], "margin": v["margin"], "best_layer_wins": v["wins"],
                    "level": v["level"]}
            figs[f"probe_{m}"] = per_label
            rep = _revelio(["probe", "report", "--store", str(stores[m]), "--sae", _list([saes[m] / "sae"]),
                            "--labels", _list(labels),
                            "--out", str(out / "probe_report" / m), "--progress", progress])
            paths[f"probe_report_{m}"] = rep["out"]
            mono: dict[str, Any] = {}
            for s in rep["summaries"]:
                mono.setdefault(s["label"], {})[s["latents"]] = {
                    "mean_purity": s["mean_purity"], "mean_purity_shuffled": s["mean_purity_shuffled"],
                    "fraction_purity_ge_0.9": s["fraction_purity_ge_0.9"],
                    "classes_purity_ge_0.9": s["classes_purity_ge_0.9"]}
            figs[f"monosemanticity_{m}"] = mono

    @stage("saliency")
    def _saliency():
        prompts = ["a red circle and a blue square", "a green triangle and a yellow star"]
        common = ["--prompts", json.dumps(prompts), "--steps", str(cfg.saliency_steps), "--guidance_scale", "4",
                  "--seed", str(cfg.seed),
                  "--progress", progress]
        daam = _revelio(["saliency", "--model.id", "tiny-sd", "--method", "daam", *common,
                         "--out", str(out / "saliency" / "daam")])
        ca = _revelio(["saliency", "--model.id", "tiny-flux", "--method", "concept_attention", *common,
                       "--concepts", "[red,blue,green,yellow,circle,square,triangle,star,background]",
                       "--out", str(out / "saliency" / "concept_attention")])
        paths["saliency_daam"] = [str(p) for p in daam]
        paths["saliency_concept_attention"] = [str(p) for p in ca]

    @stage("segment")
    def _segment():
        # one table per word type (the demo's label first, in segment/; the other in segment/<label>_words/),
        # each with the centre prior beside every method
        figs["segmentation"] = {}
        for n, lab in enumerate(labels):
            folder = out / "segment" if n == 0 else out / "segment" / f"{lab}_words"
            r = _revelio(["segment", "--dataset", "shapes", "--split", "test", "--count", str(cfg.segment_images),
                          "--methods", "[concept_attention,cross_attention,daam,center_prior]",
                          "--seeds", _list(cfg.segment_seeds), "--label", lab, "--seed", str(cfg.seed),
                          "--out", str(folder)])
            paths["segment_table" if n == 0 else f"segment_table_{lab}"] = str(folder / "table.md")
            figs["segmentation"][lab] = {m: {k: v for k, v in r[m].items() if k in ("accuracy", "miou", "map")}
                                         for m in r}

    def _compare_out(m: str) -> Path:
        return out / "compare" / m

    @stage("compare")
    def _compare():
        for m in MODELS:
            r = _revelio(["compare", "--source.sae", str(saes[m] / "sae"), "--images", str(cfg.compare_images),
                          "--out", str(_compare_out(m)), "--progress", progress])
            paths[f"compare_{m}"] = str(r["paths"]["json"])
            w = r["summary"]["concepts_where_best_latent_beats_saliency"]
            figs[f"compare_{m}"] = {"saliency": r["summary"]["method"],
                                    "best_latent_beats_saliency": f"{w['count']} of {w['of']} concepts"}

    @stage("browse")
    def _browse():
        for m in MODELS:
            npz = _compare_out(m) / "alignment.npz"
            args = ["browse", "--source.sae", str(saes[m] / "sae"), "--images", str(cfg.compare_images),
                    "--limit", "32", "--out", str(out / "dashboard" / m), "--progress", progress]
            if npz.exists():
                args += ["--alignment", str(npz), "--sort", "alignment"]
            paths[f"dashboard_{m}"] = str(_revelio(args))

    @stage("steer")
    def _steer():
        concept = "blue" if cfg.label == "colour" else "circle"  # a concept absent from the prompt
        latent = _steer_latent(_compare_out("tiny-sd") / "alignment.json", concept)
        r = _revelio(["steer", "--source.sae", str(saes["tiny-sd"] / "sae"), "--prompt", "a red square",
                      "--latent", str(latent), "--scale", str(cfg.steer_scale),
                      "--inference_steps", str(cfg.saliency_steps),
                      "--out", str(out / "steer" / f"tiny-sd-latent{latent}.png")])
        paths["steer"] = str(r["path"])
        figs["steer"] = {"latent": latent, "concept": concept, "mean_abs_pixel_change": r["mean_abs_diff"]}

    @stage("erase")
    def _erase():
        from ..datasets.shapes import COLORS, SHAPES, phrase

        c = cfg.erase_concept
        others = [k for k in COLORS if k != c]
        r = _revelio(["erase", "--source.sae", str(saes["tiny-sd"] / "sae"), "--concept", c,
                      "--n_latents", _list([cfg.erase_latents]), "--strengths", _list([cfg.erase_strength]),
                      "--with_prompts", json.dumps([phrase(c, s) for s in SHAPES[:3]]),
                      "--without_prompts", json.dumps([phrase(o, SHAPES[i]) for i, o in enumerate(others[:3])]),
                      "--seeds", "[0]", "--inference_steps", str(cfg.erase_steps), "--judge_images", "100",
                      "--seed", str(cfg.seed), "--out", str(out / "erase")])
        paths["erase"] = str(r["paths"]["table"])
        figs["erase"] = {"concept": c, **{row["method"]: {k: row[k] for k in (
            "n", "strength", "erasure", "n_shown", "retention", "fidelity_with", "pixel_change_without")}
            for row in r["rows"]}}

    res["seconds"] = timings
    res["total_seconds"] = round(time.perf_counter() - start, 1)
    _write_summary(out, res)
    _print_summary(res)
    return res


def _steer_latent(alignment_json: Path, concept: str) -> int:
    """The latent that best matches ``concept``'s masks in a compare run (latent 0 without one)."""
    if not alignment_json.exists():
        return 0
    info = json.loads(alignment_json.read_text()).get("concepts", {}).get(concept, {})
    best = info.get("best_latents", {}).get("mask") or info.get("best_latents", {}).get("saliency") or [0]
    return int(best[0])


BASELINE_SHORT = {"pixels": "flat pixels", "mean_colour": "mean colour", "histogram": "colour histogram"}
SEG_SHORT = {"concept_attention": "ConceptAttention", "cross_attention": "cross-attn", "daam": "DAAM",
             "center_prior": "centre prior"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _summary_lines(res: dict[str, Any]) -> list[str]:
    p, f = res["paths"], res["figures"]
    lines = []
    for m in MODELS:
        if f"store_{m}" in p:
            lines.append(f"extract   {m}: {p[f'store_{m}']} ({f.get(f'store_{m}_mb')} MB)")
    for m in MODELS:
        if f"sae_{m}" in f:
            s = f[f"sae_{m}"]
            lines.append(f"sae       {m} {s['hook']} t={s['timestep']}: held-out FVU {_fmt(s['fvu'])}, "
                         f"L0 {_fmt(s['l0'])}, dead {_fmt(s['dead_fraction'])} -> {p[f'sae_{m}']}")
    for m in MODELS:
        if f"probe_{m}" in f:
            for n, (lab, s) in enumerate(f[f"probe_{m}"].items()):
                base = ", ".join(f"{BASELINE_SHORT.get(k, k)} {_fmt(v)}" for k, v in s["baselines"].items())
                if s["strongest_baseline"] is None:
                    verdict = "no pixel baselines"
                elif s.get("level"):
                    verdict = (f"LEVEL with {BASELINE_SHORT.get(s['strongest_baseline'])} ({s['margin']:+.3f}, "
                               "within the seed spread)")
                elif s["best_layer_wins"]:
                    verdict = (f"beats the best baseline ({BASELINE_SHORT.get(s['strongest_baseline'])}) "
                               f"by {s['margin']:.3f}")
                else:
                    verdict = f"{BASELINE_SHORT.get(s['strongest_baseline'])} WINS by {-s['margin']:.3f}"
                lines.append(f"{'probe' if n == 0 else '':<10}{m} {lab}: best layer {s['best_layer']} "
                             f"{_fmt(s['best_layer_accuracy'])} vs {base} -> {verdict}; SAE codes "
                             f"{_fmt(s['sae_codes_accuracy'])}, chance {_fmt(s['chance'])}"
                             + (f" -> {p[f'probes_{m}']}" if n == 0 else ""))
            for lab, kinds in f[f"monosemanticity_{m}"].items():
                sae, neu = kinds.get("sae", {}), kinds.get("neurons")
                line = f"          {m} {lab} purity: SAE latents {_fmt(sae.get('mean_purity'))}"
                if neu:
                    line += f", neurons {_fmt(neu['mean_purity'])}"
                line += f", labels shuffled {_fmt(sae.get('mean_purity_shuffled'))}"
                if neu:
                    d = sae["mean_purity"] - neu["mean_purity"]
                    line += f" -> SAE beats neurons by {d:.3f}" if d > 0 else f" -> neurons as pure or purer ({-d:.3f})"
                lines.append(line)
            lines[-1] += f" -> {p[f'probe_report_{m}']}"
    if "saliency_daam" in p:
        lines.append(f"saliency  DAAM overlays: {', '.join(p['saliency_daam'])}")
        lines.append(f"          ConceptAttention overlays: {', '.join(p['saliency_concept_attention'])}")
    if "segmentation" in f:
        for n, (lab, res_) in enumerate(f["segmentation"].items()):
            rows = ", ".join(f"{SEG_SHORT.get(m, m)} {v.get('miou', float('nan')):.1f}/{v.get('map', float('nan')):.1f}"
                             for m, v in res_.items())
            where = p["segment_table"] if n == 0 else p.get(f"segment_table_{lab}")
            lines.append(f"{'segment' if n == 0 else '':<10}{lab} words mIoU/mAP: {rows} -> {where}")
    for m in MODELS:
        if f"compare_{m}" in f:
            s = f[f"compare_{m}"]
            lines.append(f"compare   {m}: best latent beats {s['saliency']} for {s['best_latent_beats_saliency']} "
                         f"-> {p[f'compare_{m}']}")
    for m in MODELS:
        if f"dashboard_{m}" in p:
            lines.append(f"browse    {m} dashboard: {p[f'dashboard_{m}']}")
    if "steer" in p:
        s = f["steer"]
        lines.append(f"steer     tiny-sd latent {s['latent']} (best for '{s['concept']}'): mean |pixel change| "
                     f"{_fmt(s['mean_abs_pixel_change'])} -> {p['steer']}")
    if "erase" in f and "erase" in p:
        e = f["erase"]
        for method, text in (("sae", "SAE latents"), ("random", "random latents"),
                             ("negative_prompt", "negative prompt")):
            if method in e:
                r = e[method]
                what = f"{r['n']} {text} x (1 - {r['strength']:g})" if method != "negative_prompt" else text
                lines.append(f"{'erase' if method == 'sae' else '':<9} tiny-sd '{e['concept']}' by {what}: erasure "
                             f"{_fmt(r['erasure'])} of {r['n_shown']}, retention {_fmt(r['retention'])}, object kept "
                             f"{_fmt(r['fidelity_with'])}, |pixel change| without {_fmt(r['pixel_change_without'])}")
        lines.append(f"          erasure table: {p['erase']}")
    return lines


def _write_summary(out: Path, res: dict[str, Any]) -> None:
    from ..files import write_text_atomic

    write_text_atomic(out / "summary.json", json.dumps(res, indent=2, default=str))
    body = "\n".join(_summary_lines(res))
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in res["seconds"].items())
    write_text_atomic(out / "summary.md", f"# Revelio demo\n\n```\n{body}\n```\n\nTime: {timing}; "
                                          f"total {res['total_seconds']:.0f}s\n")


def _print_summary(res: dict[str, Any]) -> None:
    print("\n" + "=" * 100)
    print(f"Revelio demo finished in {res['total_seconds'] / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in res['seconds'].items())})")
    for line in _summary_lines(res):
        print(line)
    print("=" * 100)
