"""``revelio compare``, ``revelio browse`` and ``revelio steer``: SAE features against saliency, browsed, steered."""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..cli import command
from ..config import ConfigError, field, to_dict

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """Which SAE, which store and (when a pipeline is needed) which model."""

    sae: str = field("runs/sae/sae", help="SAE folder (sae_weights.safetensors + cfg.json, SAELens 6 layout)")
    store: str | None = field(None, help="activation store (null: the SAE's source store from its cfg.json)")
    model: str | None = field(None, help="pipeline: zoo name, folder or hub id (null: the store's model)")
    device: str = field("cpu", help="torch device: cpu | cuda | cuda:1 | mps")
    dtype: str = field("float32", help="pipeline dtype: float32 | float16 | bfloat16")


def open_sources(src: SourceConfig) -> tuple[Any, Any]:
    """(SAE module, open store) of ``src``; the SAE's cfg names its store unless ``src.store`` does."""
    import sae
    from extraction.store import open_store

    model = sae.load(src.sae, device=src.device)
    path = src.store or model.cfg.get("source_store")
    if not path:
        raise ValueError(f"{src.sae}/cfg.json names no source store; pass --source.store")
    store = open_store(path)
    if model.cfg.get("samples") == "pooled":
        log.warning("the SAE at %s was trained on pooled (image-level) features; its per-position maps are an "
                    "extrapolation. Train on tokens (samples: tokens) for spatial analysis.", src.sae)
    return model, store


def load_model_pipeline(src: SourceConfig, store: Any) -> Any:
    """The pipeline named by ``src.model``, else the one the store was extracted with."""
    from ..zoo import load_pipeline

    name = src.model or str(store.attrs.get("model", ""))
    if not name:
        raise ValueError(f"{store.path} records no model; pass --source.model")
    return load_pipeline(name, device=src.device, dtype=src.dtype)


def first_rows(store: Any, n: int | None) -> np.ndarray:
    """The first ``n`` done rows of ``store`` (all when ``n`` is null)."""
    rows = np.flatnonzero(store.done)
    if n is not None:
        if n < 1:
            raise ValueError(f"images must be >= 1 (or null for all), got {n}")
        rows = rows[:n]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CompareConfig:
    source: SourceConfig = field(default_factory=SourceConfig, help="")
    images: int | None = field(64, min=1, help="store images to score (the first done rows; null: all)")
    method: str = field("auto", help="saliency: auto (DAAM for UNets, ConceptAttention for MM-DiTs) | daam | "
                                     "concept_attention | cross_attention | none")
    concepts: list[str] | None = field(None, nonempty=True, help="concept words (null: each image's own; ConceptAttention: the data "
                                                  "set's class names + background)")
    timestep: int | None = field(None, min=0, max=999, help="noise timestep of the saliency pass (null: the SAE's timestep)")
    metric: str = field("iou", help="ranking metric: iou | pearson | auroc")
    tau: float = field(0.4, above=0, below=1, help="threshold on min-max normalised maps for IoU (DAAM's 0.4)")
    eval_size: int = field(64, min=1, help="maps and masks are compared on this square grid")
    top: int = field(5, min=1, help="best latents listed per concept and reference")
    batch_size: int = field(8, min=1, help="images per saliency pass")
    seed: int = field(0, help="noise seed of the saliency pass")
    out: str = field("runs/compare", help="output folder: alignment.csv, alignment.json, alignment.npz")
    progress: bool = field(True, help="show a progress bar")


@command("compare", CompareConfig)
def compare_cmd(cfg: CompareConfig) -> dict[str, Any]:
    """Rank SAE latents per concept by agreement with saliency maps and ground-truth masks; CSV/JSON tables."""
    from ..analysis.alignment import METRICS, SALIENCY_METHODS, SaliencyMaps, align_store
    from ..files import write_text_atomic
    from ..analysis.feature_maps import sae_site, store_dataset, store_samples

    if cfg.method not in SALIENCY_METHODS:
        raise ValueError(f"method {cfg.method!r} is not one of {', '.join(SALIENCY_METHODS)}")
    if cfg.metric not in METRICS:
        raise ValueError(f"metric {cfg.metric!r} is not one of {', '.join(METRICS)}")
    model, store = open_sources(cfg.source)
    with store:
        hook, t = sae_site(model)
        rows = first_rows(store, cfg.images)
        ds = store_dataset(store)
        samples = store_samples(store, rows, ds)
        saliency = None
        if cfg.method != "none":
            vocab = cfg.concepts or (list(ds.class_names) + ["background"])
            size = int(store.config.get("data", {}).get("size", samples[0].image.size[0]))
            saliency = SaliencyMaps(load_model_pipeline(cfg.source, store), cfg.method,
                                    cfg.timestep if cfg.timestep is not None else t, seed=cfg.seed, size=size,
                                    vocabulary=vocab)
        table = align_store(store, model, rows, samples, saliency, vocabulary=cfg.concepts, eval_size=cfg.eval_size,
                            tau=cfg.tau, batch_size=cfg.batch_size, progress=cfg.progress)
        out = Path(cfg.out)
        rows_out = table.table(cfg.metric, cfg.top)
        summary = table.summary(cfg.metric, cfg.top)
        summary.update(sae=str(cfg.source.sae), store=str(store.path), hook=hook, timestep=t, images=len(rows),
                       method=saliency.method if saliency is not None else "none", config=to_dict(cfg))
        buf = io.StringIO()
        fields = ["concept", "ranked_by", "rank", "latent", "n_images"] + [f"{r}_{m}" for r in ("saliency", "mask")
                                                                           for m in METRICS]
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows_out)
        paths = {"csv": write_text_atomic(out / "alignment.csv", buf.getvalue()),
                 "json": write_text_atomic(out / "alignment.json",
                                       json.dumps({**summary, "table": rows_out}, indent=2, default=_json_default)),
                 "npz": table.save(out / "alignment.npz")}
    _print_compare(summary)
    print(f"compare: wrote {', '.join(str(p) for p in paths.values())}")
    return {"paths": paths, "summary": summary, "table": table}


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _print_compare(summary: dict[str, Any]) -> None:
    m = summary["metric"]
    print(f"compare: {summary['images']} images, hook {summary['hook']} t={summary['timestep']}, saliency "
          f"{summary['method']}, ranked by {m}")
    for c, info in summary["concepts"].items():
        best = info["best_latents"]
        line = f"  {c:<12} best latents: " + "; ".join(f"{ref} {v[:3]}" for ref, v in best.items())
        b = info["best_latent_vs_saliency"]
        if b is not None:
            line += (f" | held-out {m}: latent {b['latent']} {b['latent_score']:.3f} vs saliency "
                     f"{b['saliency_score']:.3f} (wins {b['win_rate']:.0%} of {b['n_eval']})")
        print(line)
    w = summary["concepts_where_best_latent_beats_saliency"]
    if w["of"]:
        print(f"  the best latent beats the saliency map for {w['count']} of {w['of']} concepts (held-out images)")


# ---------------------------------------------------------------------------------------------------------------
# browse
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BrowseConfig:
    source: SourceConfig = field(default_factory=SourceConfig, help="")
    images: int | None = field(None, min=1, help="store images to browse (the first done rows; null: all)")
    sort: str = field("frequency", help="latent order: frequency | purity | alignment | index")
    limit: int | None = field(None, min=1, help="latents given a page, the first in sort order (null: every live latent); "
                                         "the index lists every latent either way")
    top_k: int = field(8, min=1, help="top-activating images per latent")
    alignment: str | None = field(None, help="alignment.npz of a compare run (null: score against the data set's "
                                             "masks when it has them)")
    eval_size: int = field(32, min=1, help="grid of the mask alignment computed when alignment is null")
    out: str = field("runs/dashboard", help="folder of the static HTML dashboard (index.html)")
    progress: bool = field(True, help="show a progress bar")


@command("browse", BrowseConfig)
def browse_cmd(cfg: BrowseConfig) -> Path:
    """Write the static HTML feature dashboard (top images with heat maps, histograms, labels, best concepts)."""
    from ..analysis.alignment import AlignmentTable
    from ..analysis.browser import SORT_KEYS, FeatureBrowser

    if cfg.sort not in SORT_KEYS:
        raise ValueError(f"sort {cfg.sort!r} is not one of {', '.join(SORT_KEYS)}")
    table = AlignmentTable.load(cfg.alignment) if cfg.alignment else None
    model, store = open_sources(cfg.source)
    with store:
        if table is not None and table.d_sae != model.d_sae:
            raise ValueError(f"{cfg.alignment} scores {table.d_sae} latents but the SAE has {model.d_sae}")
        browser = FeatureBrowser(store, model, rows=first_rows(store, cfg.images), alignment=table,
                                 top_k=cfg.top_k, eval_size=cfg.eval_size, progress=cfg.progress)
        index = browser.export(cfg.out, by=cfg.sort, limit=cfg.limit)
    pages = len(browser.order(cfg.sort)[:cfg.limit])
    print(f"browse: dashboard of {model.d_sae} latents ({pages} with a page) at {index}")
    return index


# ---------------------------------------------------------------------------------------------------------------
# steer
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SteerConfig:
    source: SourceConfig = field(default_factory=SourceConfig, help="")
    prompt: str = field("a red circle and a blue square", help="prompt of the generation")
    latent: int = field(0, min=0, help="SAE latent to steer with")
    mode: Literal["add", "remove"] = field("add", help="add (x + scale * d) | remove (x - scale * z_latent(x) * d)")
    scale: float = field(4.0, help="coefficient, in units of the latent's activation (remove: 1 = remove all)")
    box: list[float] | None = field(None, help="region [top, bottom, left, right] as image fractions "
                                               "(null: everywhere)")
    steps: list[int] | None = field(None, nonempty=True, min=0, help="[start, end) denoising (scheduler) steps to steer, both CFG passes "
                                              "of each (null: all)")
    inference_steps: int = field(20, min=1, help="denoising steps of the generation")
    guidance_scale: float = field(5.0, help="classifier-free guidance scale")
    size: int | None = field(None, min=1, help="image side in pixels (null: the pipeline's default)")
    seed: int = field(0, help="generation seed (the same for before and after)")
    out: str = field("runs/steer.png", help="before/after figure (PNG)")


@command("steer", SteerConfig)
def steer_cmd(cfg: SteerConfig) -> dict[str, Any]:
    """Generate with and without an SAE latent's direction added/removed at its hook; saves a before/after PNG."""
    import matplotlib.pyplot as plt

    from ..analysis.steering import Steering, SteeringSpec, box_mask, generate
    from ..viz import save_figure

    model, store = open_sources(cfg.source)
    spec = SteeringSpec(latent=cfg.latent, scale=cfg.scale, mode=cfg.mode,
                        mask=box_mask(cfg.box) if cfg.box is not None else None,
                        steps=tuple(cfg.steps) if cfg.steps is not None else None)
    spec.check(model.d_sae)  # bad input fails before the pipeline loads
    if spec.steps is not None and spec.steps[0] >= cfg.inference_steps:
        raise ConfigError(f"steps {list(spec.steps)} start after the generation's last denoising step "
                          f"(inference_steps {cfg.inference_steps}: steps 0..{cfg.inference_steps - 1}); nothing "
                          f"would be steered")
    with store:
        pipe = load_model_pipeline(cfg.source, store)
    steering = Steering(pipe, model, [spec])  # what steer() does, keeping the steering's counts to report
    before = generate(pipe, cfg.prompt, cfg.seed, cfg.inference_steps, cfg.guidance_scale, cfg.size)
    with steering:
        after = generate(pipe, cfg.prompt, cfg.seed, cfg.inference_steps, cfg.guidance_scale, cfg.size)
    steered = dict(sorted(steering.steered_per_step.items()))
    calls = dict(sorted(steering.calls_per_step.items()))
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.3))
    for ax, img, title in zip(axes, (before, after), ("before", f"{cfg.mode} latent {cfg.latent} x {cfg.scale:g}")):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(cfg.prompt, fontsize=9)
    out = save_figure(fig, cfg.out)
    diff = float(np.abs(np.asarray(before, dtype=np.float32) - np.asarray(after, dtype=np.float32)).mean())
    per_step = sorted(set(calls.values()))
    print(f"steer: latent {cfg.latent} ({cfg.mode}, scale {cfg.scale:g}) at denoising steps {list(steered)} of "
          f"{len(calls)} ({'/'.join(map(str, per_step))} denoiser call(s) a step, every one of a steered step "
          f"steered) changed pixels by {diff:.2f}/255 on average; wrote {out}")
    return {"before": before, "after": after, "path": out, "mean_abs_diff": diff, "steered_per_step": steered,
            "calls_per_step": calls}
