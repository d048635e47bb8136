"""``revelio probe``: probe every layer x timestep of a store; ``revelio probe report``: SAE monosemanticity.

The probes themselves live in the ``probes`` stage; this module adds what needs the rest of
Revelio: re-rendering the store's images for the pixel baseline (from the data-set config
the store recorded), class names, the result files and the figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from probes import DEFAULT_CS

from ..cli import command
from ..config import ConfigError, field, to_dict
from ..paths import inside, safe_name

log = logging.getLogger(__name__)



@dataclass
class BaselineConfig:
    pixels: bool = field(True, help="baselines from the pixels of the same images (re-rendered from the store's "
                                    "data config): flattened pixels, and with `pooled` mean colour and histogram")
    pixel_size: int = field(16, min=0, help="side the images are resized to before flattening (0: the store's image size)")
    pooled: bool = field(True, help="also the pixel baselines pooled like the features (grid: per cell): the "
                                    "images' mean RGB (mean_colour) and colour histogram (histogram)")
    histogram_bins: int = field(4, min=1, help="histogram bins per channel")
    histogram_joint: bool = field(True, help="one joint histogram over the bins^3 RGB cubes (default: the strongest "
                                             "variant measured, docs/probes.md); false: one per channel")
    random: bool = field(True, help="probe random ReLU features of the pixels, one per distinct activation width")


@dataclass
class StreamingConfig:
    samples: Literal["pooled", "tokens"] = field("pooled", help="pooled image vectors | every position (tokens)")
    epochs: int = field(10, min=1, help="passes over the training images")
    batch_size: int = field(256, min=1, help="samples per optimiser step")
    chunk_images: int = field(256, min=1, help="images read from the store at once (bounds RAM)")
    lr: float = field(0.01, above=0, help="Adam learning rate")
    weight_decays: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2],
                                       nonempty=True, min=0, help="L2 path, one head each, chosen on held-out training images")
    val_fraction: float = field(0.2, above=0, below=1, help="share of the training images held out to choose the L2 strength")
    accelerator: Literal["cpu", "gpu", "cuda", "mps", "auto"] = field("cpu", help="Lightning accelerator: cpu | gpu | auto")
    precision: str = field("32-true", help="Lightning precision: 32-true | bf16-mixed | 16-mixed")
    threads: int | None = field(None, min=1, help="torch CPU threads while training (null: leave torch's setting)")


@dataclass
class ProbeConfig:
    store: str = field("runs/activations.h5", help="activation store written by `revelio extract`")
    hooks: list[str] | None = field(None, nonempty=True, help="hooks to probe (null: every hook in the store)")
    timesteps: list[int] | None = field(None, nonempty=True, min=0, max=999, help="timesteps to probe (null: every timestep of each hook)")
    sae: list[str] = field(default_factory=list, help="SAE folders: add probes on their codes (linear and k-sparse)")
    labels: list[str] | None = field(None, help="attributes to probe, one sweep each, re-read from the store's data "
                                                "set (shapes: [colour, shape]); null: the store's own labels")
    out: str = field("runs/probes", help="output folder: probes.csv, probes.json, heatmap.png")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], nonempty=True, help="split seeds; spread over them is reported")
    min_class_images: int = field(3, min=1, help="classes with fewer images are left out (a split needs 1 test + 2 train)")
    test_fraction: float = field(0.25, above=0, below=1, help="share of each class's images in the test split (never used to choose C)")
    cv_folds: int = field(5, min=2, help="cross-validation folds on the training images for choosing C")
    Cs: list[float] = field(default_factory=lambda: list(DEFAULT_CS), nonempty=True, above=0, help="inverse L2 strengths of the path")
    max_iter: int = field(1000, min=1, help="L-BFGS iterations per fit")
    ks: list[int] | None = field(None, nonempty=True, min=1, help="k values of the sparse probes (null: 1, 2, 4, ... up to k_max)")
    k_max: int = field(64, min=1, help="largest default k of the sparse probes")
    sparse_raw: bool = field(True, help="also run k-sparse probes on the raw features of each SAE's hook/timestep")
    backend: Literal["sklearn", "torch"] = field("sklearn",
                                                 help="sklearn (in RAM) | torch (Lightning, streams the store)")
    grid: int = field(1, min=1, help="raw features: 1 = spatial mean; g > 1 = means over a g x g grid of the map "
                              "(C*g*g features, keeps coarse layout; needs maps, sklearn backend)")
    streaming: StreamingConfig = field(default_factory=StreamingConfig, help="")
    baselines: BaselineConfig = field(default_factory=BaselineConfig, help="")
    device: str = field("cpu", help="torch device for SAE encoding")
    progress: bool = field(True, help="show a progress bar")


@dataclass
class ReportConfig:
    store: str = field("runs/activations.h5", help="activation store the SAEs were trained on")
    sae: list[str] = field(default_factory=lambda: ["runs/sae/sae"],
                           help="SAE folders to report on (one report per SAE; `revelio sae` writes runs/sae/sae)")
    out: str = field("runs/probe_report", help="output folder: one subfolder per SAE hook/timestep, summary.csv")
    labels: list[str] | None = field(None, help="attributes to score purity on, one report each (shapes: "
                                                "[colour, shape]); null: the store's own labels")
    neurons: bool = field(True, help="also score the model's own channels of the SAE's hook (pooled like the "
                                     "SAE codes) as latents: the baseline an SAE should beat")
    top_n: int = field(16, min=1, help="top-activating images per latent that purity and entropy are computed on")
    seed: int = field(0, help="seed of the label shuffle behind purity_shuffled")
    n_show: int = field(8, min=0, help="latents shown in the top-image figure (best ranked)")
    device: str = field("cpu", help="torch device for SAE encoding")
    batch_size: int = field(64, min=1, help="images encoded at once")
    progress: bool = field(True, help="show a progress bar")


def _dataset_of(store: Any):
    """The data set a store was extracted from, rebuilt from the data config it recorded."""
    from ..datasets import DataConfig, load_dataset

    data = (store.config or {}).get("data")
    if not isinstance(data, dict):
        raise ConfigError(f"{store.path} records no data-set config (root attr 'config' has no 'data' section); "
                          "set baselines.pixels false to probe without the pixel baseline")
    return load_dataset(DataConfig(**data))


def _dataset_index(store: Any, ds: Any, rows: np.ndarray) -> tuple[dict[str, int], np.ndarray]:
    """(data-set index of every sample id, the ids of store ``rows``); an id the data set lacks is a ConfigError."""
    index = {sid: i for i, sid in enumerate(ds.ids())}
    ids = store.ids[rows]
    missing = [i for i in ids if i not in index]
    if missing:
        raise ConfigError(f"{len(missing)} image id(s) of {store.path} (e.g. {missing[0]!r}) are not in the data set "
                          "its config describes; was the data set changed since extraction?")
    return index, ids


def store_images(store: Any, rows: np.ndarray, ds: Any = None) -> list[Any]:
    """The store's images ``rows`` (PIL, in row order), re-rendered from the data set it recorded."""
    ds = _dataset_of(store) if ds is None else ds
    index, ids = _dataset_index(store, ds, rows)
    samples = {s.id: s for s in ds.iter_samples([index[i] for i in ids])}
    if len(samples) != len(ids):
        raise ConfigError(f"{len(ids) - len(samples)} image(s) of {store.path} can no longer be read from its data set "
                          "(set baselines.pixels false to probe without pixels)")
    return [samples[sid].image for sid in ids]


def store_pixels(store: Any, rows: np.ndarray, size: int, images: list[Any] | None = None) -> np.ndarray:
    """(n, size*size*3) pixels in [0, 1] of the store's images ``rows`` (resized to ``size``; 0 keeps them)."""
    from PIL import Image

    out = []
    for img in store_images(store, rows) if images is None else images:
        if size:
            img = img.resize((size, size), Image.BILINEAR)
        out.append(np.asarray(img.convert("RGB"), dtype=np.float32).ravel() / 255.0)
    return np.stack(out)


def pixel_baselines(store: Any, rows: np.ndarray, cfg: BaselineConfig, grid: int = 1) -> dict[str, np.ndarray]:
    """The pixel baselines ``cfg`` asks for, from the store's images ``rows`` re-rendered once:
    ``pixels`` (flattened, resized) and, with ``cfg.pooled``, ``mean_colour`` and ``histogram`` (pooled
    like the features: per image, or per cell of the same grid)."""
    import probes

    if not cfg.pixels:
        return {}
    images = store_images(store, rows)
    out = {"pixels": store_pixels(store, rows, cfg.pixel_size, images)}
    if cfg.pooled:
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
        out["mean_colour"] = probes.mean_colour(arr, grid)
        out["histogram"] = probes.colour_histogram(arr, cfg.histogram_bins, grid, cfg.histogram_joint)
    return out


BASELINE_NAMES = {"pixels": "flattened pixels", "mean_colour": "mean colour", "histogram": "colour histogram"}


def store_label_name(store: Any) -> str | None:
    """The attribute the store's labels are (shapes: its data.label), None when the data set has one kind."""
    data = (store.config or {}).get("data") or {}
    return data.get("label", "shape") if data.get("name") == "shapes" else None


def store_labels(store: Any, rows: np.ndarray, label: str | None) -> tuple[np.ndarray, list[str] | None]:
    """(labels of ``rows``, class names) for attribute ``label`` of the store's data set (None: the store's own).

    Read from the data set the store recorded, rebuilt with ``label`` (shapes: ``shape`` or ``colour`` of the
    largest object), matched by image id; the store's labels are used when ``label`` is the one it holds.
    """
    from ..datasets import DataConfig, load_dataset

    own = store_label_name(store)
    if label is None or label == own:
        try:
            names = list(_dataset_of(store).class_names) or None
        except ConfigError:
            names = None
        return store.labels[rows], names
    data = (store.config or {}).get("data")
    if not isinstance(data, dict) or data.get("name") != "shapes":
        raise ConfigError(f"labels: {store.path} was not extracted from the shapes world (data "
                          f"{(data or {}).get('name')!r}); only its own labels can be probed (labels: null)")
    try:
        ds = load_dataset(DataConfig(**{**data, "label": label}))
    except ValueError as e:
        raise ConfigError(f"labels: {e}") from None
    index, ids = _dataset_index(store, ds, rows)
    key = "shape" if label == "shape" else "color"
    names = list(ds.class_names)
    return np.array([names.index(ds.layout(index[i])[0][key]) for i in ids], dtype=np.int64), names


def verdict_line(label: str | None, v: dict[str, Any] | None) -> str | None:
    """One sentence: the best layer against each pixel baseline, and whether a baseline wins."""
    if v is None:
        return None
    b = v["best"]
    head = f"{label} label: " if label else ""
    line = f"{head}best layer {b['hook']} t={b['timestep']} {b['accuracy']:.3f}"
    if not v["baselines"]:
        return line + f" (chance {b['chance']:.3f}; no pixel baselines)"
    parts = [f"{BASELINE_NAMES.get(k, k)} {x['accuracy']:.3f} ({x['margin']:+.3f})" for k, x in v["baselines"].items()]
    line += " vs " + ", ".join(parts) + f", chance {b['chance']:.3f}: "
    strongest = BASELINE_NAMES.get(v["strongest"], v["strongest"])
    if v.get("level"):
        return line + (f"LEVEL with the {strongest} baseline ({v['margin']:+.3f}, within the spread over seeds): "
                       "no evidence the features know more than the pixels")
    if v["wins"]:
        return line + f"the best layer beats every pixel baseline (strongest: {strongest}, by {v['margin']:.3f})"
    return line + (f"the {strongest} baseline WINS by {-v['margin']:.3f}: pixels alone carry this label at least as "
                   "well as the best layer")


def _keys(store: Any, hooks: list[str] | None, timesteps: list[int] | None) -> list[tuple[str, int]]:
    keys = []
    for h in hooks if hooks is not None else store.hooks:
        ts = store.timesteps(h)  # KeyError naming the store's hooks
        for t in timesteps if timesteps is not None else ts:
            store.d_in(h, int(t))  # KeyError naming the hook's timesteps
            keys.append((h, int(t)))
    if not keys:
        raise ConfigError(f"no (hook, timestep) selected; the store has {store.keys()}")
    return keys


def depth_key(hook: str) -> tuple:
    """Sort key putting hooks in the order the input passes them: the adapters' answer, from the name alone."""
    from extraction.adapters import hook_depth_key  # torch: only when a command runs

    return hook_depth_key(hook)


def data_label(store: Any) -> str:
    """What the store's label is ('colour of the largest object', 'class folder', ...), from its data config."""
    data = (getattr(store, "config", None) or {}).get("data") or {}
    name = data.get("name", "?")
    if name == "shapes":
        return f"{data.get('label', 'shape')} of the largest object"
    return {"digits": "digit", "folder": "class folder", "hf": "label column"}.get(name, "label")


def plot_heatmap(records: list[dict[str, Any]], keys: list[tuple[str, int]], path: Path, title: str,
                 label: str | None = None) -> Path:
    """Layer x timestep accuracy of the raw linear probes (rows by depth), the label probed, baselines and chance
    in the title."""
    import matplotlib.pyplot as plt

    from ..viz import save_figure

    hooks = sorted(dict.fromkeys(h for h, _ in keys), key=depth_key)
    ts = sorted({t for _, t in keys})
    acc = np.full((len(hooks), len(ts)), np.nan)
    sd = np.full_like(acc, np.nan)
    for r in records:
        if r["features"] == "raw" and r["probe"].startswith("linear"):
            i, j = hooks.index(r["hook"]), ts.index(r["timestep"])
            acc[i, j], sd[i, j] = r["accuracy_mean"], r["accuracy_std"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(ts), 1.2 + 0.55 * len(hooks)))
    im = ax.imshow(acc, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(len(hooks)):
        for j in range(len(ts)):
            if np.isfinite(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.2f}\n±{sd[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if acc[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(ts)), [str(t) for t in ts])
    ax.set_yticks(range(len(hooks)), hooks)
    ax.set_xlabel("timestep")
    ax.set_ylabel("layer (hook), input side first")
    base = [f"{r['hook']} {r['accuracy_mean']:.2f}" for r in records if r["features"] not in ("raw", "sae")]
    chance = np.mean([r["chance_mean"] for r in records]) if records else float("nan")
    grid = next((r.get("grid") for r in records if r.get("grid")), 1)
    pooled = "spatial mean" if grid == 1 else f"{grid}x{grid} grid means"
    what = f"label: {label}" if label else "label"
    ax.set_title(f"{title}\nlinear probe test accuracy predicting the {what}\non {pooled} (mean ± std over seeds); "
                 f"chance {chance:.2f}"
                 + (f"; baselines: {', '.join(base)}" if base else ""), fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05, label="test accuracy (0 to 1)")
    return save_figure(fig, path)


def plot_sparse(records: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy vs k of the k-sparse probes (SAE codes and raw features), one line per source."""
    import matplotlib.pyplot as plt

    from ..viz import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.5))
    lines: dict[str, list[tuple[int, float, float]]] = {}
    for r in records:
        if r["probe"] == "k-sparse":
            lines.setdefault(f"{r['features']} {r['hook']} t={r['timestep']}", []).append(
                (r["k"], r["accuracy_mean"], r["accuracy_std"]))
    for name, pts in lines.items():
        k, a, s = map(np.array, zip(*sorted(pts)))
        ax.errorbar(k, a, yerr=s, marker="o", capsize=2, label=name)
    chance = [r["chance_mean"] for r in records if r["probe"] == "k-sparse"]
    if chance:
        ax.axhline(float(np.mean(chance)), color="grey", linestyle="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (latents / features used)")
    ax.set_ylabel("test accuracy")
    ax.set_title("sparse probing", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


COLUMNS = ["label", "features", "hook", "timestep", "probe", "k", "grid", "d", "accuracy_mean", "accuracy_std",
           "macro_f1_mean", "macro_f1_std", "cv_accuracy_mean", "cv_accuracy_std", "cv_fold_std", "chance_mean",
           "n_images", "n_train", "n_test", "n_classes", "n_seeds", "accuracy_per_seed", "macro_f1_per_seed",
           "C_per_seed", "source"]


@command("probe", ProbeConfig)
def probe_cmd(cfg: ProbeConfig) -> dict[str, Any]:
    """Probe every hook x timestep of a store (and SAE codes) with baselines; write CSV, JSON and a heat map."""
    import probes
    from extraction.store import open_store
    from probes.io import write_csv, write_json

    out = Path(cfg.out)
    records: list[dict[str, Any]] = []
    contexts: dict[str, Any] = {}
    verdicts: dict[str, Any] = {}
    heatmaps: dict[str, Path] = {}
    with open_store(cfg.store) as st:
        keys = _keys(st, cfg.hooks, cfg.timesteps)
        rows, _ = probes.labelled_rows(st)
        label_list = list(cfg.labels) if cfg.labels else [store_label_name(st)]
        targets = {lab: store_labels(st, rows, lab)[0] for lab in label_list}  # every label checked before any work
        baselines = pixel_baselines(st, rows, cfg.baselines, cfg.grid)
        title = f"{st.attrs.get('model', '?')} on {st.attrs.get('dataset', '?')}"
        cache: dict[Any, np.ndarray] = {}  # features and SAE codes, read once for every label
        for n, lab in enumerate(label_list):
            recs, context = probes.sweep(
                st, keys=keys, saes=cfg.sae, baselines=baselines,
                random_baseline=cfg.baselines.random and "pixels" in baselines, seeds=cfg.seeds,
                test_fraction=cfg.test_fraction, min_class_images=cfg.min_class_images, Cs=cfg.Cs, cv=cfg.cv_folds,
                max_iter=cfg.max_iter, ks=cfg.ks, k_max=cfg.k_max, sparse_raw=cfg.sparse_raw, sae_device=cfg.device,
                backend=cfg.backend, streaming={**to_dict(cfg.streaming), "progress": False}, grid=cfg.grid,
                labels=targets[lab], cache=cache, progress=cfg.progress)
            records += [{"label": lab, **r} for r in recs]
            contexts[(lab or "label")] = context
            verdicts[(lab or "label")] = probes.baseline_verdict(recs)
            name = "heatmap.png" if n == 0 else f"heatmap_{lab}.png"
            heatmaps[(lab or "label")] = plot_heatmap(recs, keys, out / name, f"{title} ({context['n_images']} images)",
                                                      f"{lab} of the largest object" if lab else data_label(st))
    context = contexts[(label_list[0] or "label")]
    files = {"csv": write_csv(out / "probes.csv", records, COLUMNS),
             "json": write_json(out / "probes.json", {"config": to_dict(cfg), "context": context,
                                                      "contexts": contexts, "verdicts": verdicts,
                                                      "results": records}),
             "heatmap": heatmaps[(label_list[0] or "label")],
             **{f"heatmap_{k}": v for k, v in list(heatmaps.items())[1:]}}
    if any(r["probe"] == "k-sparse" for r in records):
        files["sparse"] = plot_sparse([r for r in records if r["label"] == label_list[0]], out / "sparse_probing.png")
    for r in records:
        if r["probe"] != "k-sparse":
            lab = f"{r['label']:<7}" if r["label"] else ""
            print(f"{lab}{r['features']:<11} {str(r['hook']):<28} t={str(r['timestep']):<5} "
                  f"acc {r['accuracy_mean']:.3f}±{r['accuracy_std']:.3f}  macro-F1 {r['macro_f1_mean']:.3f}  "
                  f"chance {r['chance_mean']:.3f}")
    for lab in label_list:
        line = verdict_line(lab, verdicts[(lab or "label")])
        if line:
            print(line)
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return {"records": records, "context": context, "contexts": contexts, "verdicts": verdicts,
            "files": {k: str(v) for k, v in files.items()}}


def plot_report(latents: list[dict[str, Any]], summary: dict[str, Any], path: Path, title: str) -> Path:
    """Four panels: purity (vs label-shuffled), firing frequency, purity vs frequency, AUROC of the ranking."""
    import matplotlib.pyplot as plt

    from ..viz import save_figure

    alive = [r for r in latents if not r["dead"]]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8), layout="constrained")
    pur = np.array([r["purity"] for r in alive])
    shuf = np.array([r["purity_shuffled"] for r in alive])
    bins = np.linspace(0, 1, 21)
    axes[0].hist([pur, shuf], bins=bins, label=["labels", "labels shuffled"])
    axes[0].set_xlabel(f"label purity of top-{summary['top_n']} images")
    axes[0].legend(fontsize=7)
    freq = np.array([r["frequency"] for r in latents])
    axes[1].hist(np.log10(np.clip(freq, 1e-6, None)), bins=30)
    axes[1].set_xlabel(f"log10 firing frequency (images; {summary['dead_fraction']:.0%} dead)")
    if alive:
        sc = axes[2].scatter([r["frequency"] for r in alive], pur, c=[r["auroc"] for r in alive], s=8,
                             cmap="viridis", vmin=0.5, vmax=1)
        fig.colorbar(sc, ax=axes[2], label="AUROC")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("firing frequency")
    axes[2].set_ylabel("purity")
    top = alive[:15]
    axes[3].barh(range(len(top)), [r["auroc"] for r in top])
    axes[3].set_yticks(range(len(top)), [f"#{r['latent']} {r['best_class']}" for r in top], fontsize=7)
    axes[3].invert_yaxis()
    axes[3].set_xlim(0.5, 1)
    axes[3].set_xlabel("AUROC (latent separates its class)")
    fig.suptitle(f"{title}: mean purity {summary['mean_purity']:.2f} (shuffled {summary['mean_purity_shuffled']:.2f})",
                 fontsize=9)
    return save_figure(fig, path)


def plot_top_images(show: list[dict[str, Any]], images: dict[int, Any], names: dict[int, str], top: int,
                    path: Path) -> Path:
    """A row of top-activating images (titled by label) for each latent of ``show``."""
    import matplotlib.pyplot as plt

    from ..viz import save_figure

    cols = max(1, min(top, max((len(r["top_images"]) for r in show), default=1)))
    fig, axes = plt.subplots(max(1, len(show)), cols, figsize=(1.1 * cols, 1.25 * max(1, len(show))), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, r in enumerate(show):
        for j, img in enumerate(r["top_images"][:cols]):
            axes[i, j].imshow(images[img])
            head = f"#{r['latent']} purity {r['purity']:.2f}\n" if j == 0 else "\n"
            axes[i, j].set_title(head + names[img], fontsize=6, loc="left")
    return save_figure(fig, path)


def mono_line(label: str | None, sae: dict[str, Any], neurons: dict[str, Any] | None) -> str:
    """One sentence: SAE latents' purity against shuffled labels and against the model's own channels."""
    head = f"{label}: " if label else ""
    line = (f"{head}SAE latents purity {sae['mean_purity']:.3f} (labels shuffled {sae['mean_purity_shuffled']:.3f}, "
            f">= 0.9: {sae['fraction_purity_ge_0.9']:.1%} of latents, classes {sae['classes_purity_ge_0.9'] or '-'})")
    if neurons is None:
        return line
    d = sae["mean_purity"] - neurons["mean_purity"]
    line += (f"; neurons {neurons['mean_purity']:.3f} (shuffled {neurons['mean_purity_shuffled']:.3f}, "
             f">= 0.9: {neurons['fraction_purity_ge_0.9']:.1%}, classes {neurons['classes_purity_ge_0.9'] or '-'})")
    return line + (f": SAE latents beat the neurons by {d:.3f}" if d > 0 else
                   f": the NEURONS are as pure or purer, by {-d:.3f}")


@command("probe report", ReportConfig)
def report_cmd(cfg: ReportConfig) -> dict[str, Any]:
    """Monosemanticity report of SAEs: label purity/entropy of each latent's top images, frequency, ranking;
    the model's own channels of the same hook ("neurons") and shuffled labels as baselines, per label."""
    import probes
    import sae as sae_pkg
    from extraction.store import open_store
    from probes.io import write_csv, write_json

    if not cfg.sae:
        raise ConfigError("probe report needs at least one SAE folder: --sae '[runs/sae/up_blocks.1_t25]'")
    out = Path(cfg.out)
    summaries = []
    with open_store(cfg.store) as st:
        rows, _ = probes.labelled_rows(st)
        label_list = list(cfg.labels) if cfg.labels else [store_label_name(st)]
        targets = {lab: store_labels(st, rows, lab) for lab in label_list}  # every label checked before any work
        try:
            ds = _dataset_of(st)
        except ConfigError:
            ds = None
        for folder in cfg.sae:
            model = sae_pkg.load(folder, device=cfg.device)
            hook, t = model.cfg.get("hook"), model.cfg.get("timestep")
            codes, tok_freq = probes.sae_codes(st, model, rows, cfg.batch_size, cfg.device, cfg.progress)
            neurons = probes.pooled_features(st, hook, t, rows) if cfg.neurons else None
            for n, lab in enumerate(label_list):
                labels, class_names = targets[lab]
                rep = probes.monosemanticity(codes, labels, cfg.top_n, tok_freq, class_names, cfg.seed)
                for r in rep["latents"]:
                    r["top_ids"] = [str(st.ids[rows[i]]) for i in r["top_images"]]
                nrep = (probes.monosemanticity(neurons, labels, cfg.top_n, None, class_names, cfg.seed, dense=True)
                        if neurons is not None else None)
                sub = inside(out, safe_name(f"{hook}_t{t}" if n == 0 else f"{hook}_t{t}_{lab}"))  # hook names come from the SAE's cfg.json
                title = (f"SAE {Path(folder).name} ({hook} t={t}, d_sae={model.d_sae}, k={model.k})"
                         + (f", label = {lab}" if lab else ""))
                body = {"sae": str(folder), "store": str(st.path), "label": lab, **rep}
                if nrep is not None:
                    body["neurons"] = {"summary": nrep["summary"],
                                       "latents": [{k: v for k, v in r.items() if k != "token_frequency"}
                                                   for r in nrep["latents"]]}
                files = {"csv": write_csv(sub / "latents.csv", rep["latents"]),
                         "json": write_json(sub / "report.json", body),
                         "figure": plot_report(rep["latents"], rep["summary"], sub / "monosemanticity.png", title)}
                if ds is not None:
                    show = [r for r in rep["latents"] if not r["dead"]][:cfg.n_show]
                    need = sorted({i for r in show for i in r["top_images"]})
                    images = dict(zip(need, (np.asarray(im) for im in store_images(st, rows[need], ds))))
                    names = {i: class_names[labels[i]] if class_names and labels[i] < len(class_names)
                             else str(labels[i]) for i in need}
                    files["top_images"] = plot_top_images(show, images, names, cfg.top_n, sub / "top_images.png")
                keep = lambda summ: {k: v for k, v in summ.items() if k != "best_latent_per_class"}  # noqa: E731
                for kind, summ in (("sae", rep["summary"]), ("neurons", nrep["summary"] if nrep else None)):
                    if summ is not None:
                        summaries.append({"sae": str(folder), "hook": hook, "timestep": t, "label": lab,
                                          "latents": kind, "d_sae": model.d_sae if kind == "sae" else neurons.shape[1],
                                          "k": model.k if kind == "sae" else None, **keep(summ)})
                print(f"{hook} t={t} " + mono_line(lab, rep["summary"], nrep["summary"] if nrep else None)
                      + f"; dead {rep['summary']['dead_fraction']:.1%}; wrote {sub}")
    write_csv(out / "summary.csv", summaries)
    return {"summaries": summaries, "out": str(out)}
