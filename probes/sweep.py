"""Sweep probes over every (hook, timestep) of a store, SAE codes and baselines, into one results table."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .evaluate import evaluate, sparse_probing
from .features import check_key, labelled_rows, pooled_features, random_features, sae_codes, sae_key
from ._checks import DEFAULT_CS
from .splits import make_splits

BACKENDS = ("sklearn", "torch")
log = logging.getLogger(__name__)


def sweep(store: Any, *, keys: Sequence[tuple[str, int]] | None = None, saes: Sequence[str | Path] = (),
          baselines: dict[str, np.ndarray] | None = None, random_baseline: bool = True,
          seeds: Sequence[int] = (0, 1, 2), test_fraction: float = 0.25, Cs: Sequence[float] = DEFAULT_CS,
          cv: int = 5, max_iter: int = 1000,
          ks: Sequence[int] | None = None, k_max: int = 64, sparse_raw: bool = True, sae_device: str = "cpu",
          min_class_images: int = 3, backend: str = "sklearn", streaming: dict[str, Any] | None = None,
          grid: int = 1, labels: np.ndarray | None = None, cache: dict[Any, np.ndarray] | None = None,
          progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Probe every (hook, t) of ``store`` (an open ``ActivationStore``); returns (records, context).

    ``baselines`` maps a name ("pixels") to an (n_labelled_rows, d) matrix aligned with
    ``labelled_rows(store)``. With ``random_baseline`` the first baseline also feeds random ReLU
    features of every distinct activation width. SAE folders add linear and k-sparse probes on
    their codes (and, with ``sparse_raw``, k-sparse probes on the raw features of the same
    hook/timestep for comparison). All rows share the same image splits (one per seed).
    Classes with fewer than ``min_class_images`` images are left out (named in the context).
    ``backend="torch"`` probes the store's (hook, t) features with ``StreamingLinearProbe``
    (keyword arguments in ``streaming``, e.g. ``samples="tokens"``) instead of scikit-learn.
    ``grid`` > 1 probes the raw features average-pooled to a grid x grid partition of each map
    (C * grid^2 features) instead of the spatial mean (scikit-learn backend; SAE codes stay pooled).
    ``labels`` (aligned with ``labelled_rows(store)``) replaces the store's labels, e.g. another
    attribute of the same images (the shapes world's colour instead of its shape). ``cache`` (a dict
    kept between calls on the same store, e.g. one sweep per label) holds the features read and the
    SAE codes computed, so a second sweep does not read or encode them again.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if grid < 1 or (grid > 1 and backend != "sklearn"):
        raise ValueError(f"grid must be >= 1 and grid > 1 needs the sklearn backend, got grid={grid}, {backend}")
    rows, y = labelled_rows(store)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != y.shape:
            raise ValueError(f"labels has {labels.shape[0] if labels.ndim else 0} entries, the store has {len(y)} "
                             "labelled rows")
        y = labels
    classes, counts = np.unique(y, return_counts=True)
    rare = classes[counts < min_class_images]
    keep = ~np.isin(y, rare)
    if rare.size:
        log.warning("leaving out classes %s: fewer than %d images each", rare.tolist(), min_class_images)
    all_rows = rows
    rows, y = rows[keep], y[keep]
    cache = {} if cache is None else cache

    def cached(key: Any, fn: Any) -> np.ndarray:
        """``fn(all labelled rows)``, computed once per cache, restricted to the rows kept here."""
        if key not in cache:
            cache[key] = fn(all_rows)
        return cache[key][keep]

    for name, Xb in (baselines or {}).items():
        if len(Xb) != len(keep):
            raise ValueError(f"baseline {name!r} has {len(Xb)} rows, the store has {len(keep)} labelled rows")
    baselines = {name: np.asarray(Xb)[keep] for name, Xb in (baselines or {}).items()}
    splits = make_splits(y, test_fraction, list(seeds))
    keys = list(store.keys()) if keys is None else [(h, int(t)) for h, t in keys]
    for h, t in keys:
        check_key(store, h, t)
    models = []
    if saes:
        import sae as sae_pkg

        models = [sae_pkg.load(p, device=sae_device) for p in saes]
    sae_keys = [sae_key(store, m) for m in models]  # every SAE matches the store before any work
    kw = dict(Cs=Cs, cv=cv, max_iter=max_iter)
    n_jobs = len(keys) + len(baselines) + 2 * len(models)
    bar = tqdm(total=n_jobs, desc="probes", disable=not progress)
    records: list[dict[str, Any]] = []

    def add(rec: dict[str, Any], **ident: Any) -> None:
        records.append({**ident, **rec})

    widths: dict[int, list[str]] = {}
    for h, t in keys:
        bar.set_postfix_str(f"{h} t={t}")
        widths.setdefault(store.d_in(h, t) * grid * grid, []).append(f"{h}@t{t}")
        if backend == "torch":
            from .streaming import evaluate_streaming

            rec = evaluate_streaming(store.path, h, t, rows, y, splits, **(streaming or {}))
        else:
            X = cached(("pooled", h, t, grid), lambda r: pooled_features(store, h, t, r, grid))
            rec = evaluate(X, y, splits, **kw)
        add({**rec, "grid": grid}, features="raw", hook=h, timestep=t, source=str(store.path))
        bar.update()
    for name, Xb in baselines.items():
        bar.set_postfix_str(name)
        add(evaluate(Xb, y, splits, **kw), features=name, hook=name, timestep=None, source="baseline")
        bar.update()
        if random_baseline and name == next(iter(baselines)):
            for d in sorted(widths):
                bar.total += 1
                Xr = random_features(Xb, d, seed=int(seeds[0]))
                add(evaluate(Xr, y, splits, **kw), features="random", hook=f"random-{d}", timestep=None,
                    source=f"random ReLU features of {name}, width of {', '.join(widths[d])}")
                bar.update()
    for p, m, (h, t) in zip(saes, models, sae_keys):
        bar.set_postfix_str(f"SAE {h} t={t}")
        Z = cached(("sae", str(p)), lambda r: sae_codes(store, m, r, device=sae_device)[0])
        ident = dict(features="sae", hook=h, timestep=t, source=str(p))
        add(evaluate(Z, y, splits, **kw), **ident)
        for rec in sparse_probing(Z, y, splits, ks, k_max, **kw):
            add(rec, **ident)
        bar.update()
        if sparse_raw:
            X = cached(("pooled", h, t, 1), lambda r: pooled_features(store, h, t, r))
            for rec in sparse_probing(X, y, splits, ks, k_max, **kw):
                add(rec, features="raw", hook=h, timestep=t, source=str(store.path))
        bar.update()
    bar.close()
    context = {"store": str(store.path), "model": store.attrs.get("model"), "dataset": store.attrs.get("dataset"),
               "n_images": int(len(y)), "classes": np.unique(y).tolist(), "left_out_classes": rare.tolist(),
               "seeds": list(seeds), "test_fraction": test_fraction, "grid": grid,
               "splits": [{"seed": s.seed, "test_rows": rows[s.test].tolist()} for s in splits]}
    return records, context


PIXEL_BASELINES = ("pixels", "mean_colour", "histogram")


def baseline_verdict(records: Sequence[dict[str, Any]],
                     baselines: Sequence[str] = PIXEL_BASELINES) -> dict[str, Any] | None:
    """The best layer (raw linear probe) against each pixel baseline of the same sweep.

    Returns None without a raw linear row, else {"best": {hook, timestep, accuracy, std}, "baselines":
    {name: {accuracy, std, margin (best - baseline)}}, "strongest": the best-scoring baseline's name (None
    without baselines), "margin": best - strongest, "wins": whether the best layer beats every baseline,
    "level": whether |margin| is within the larger seed std of the two, i.e. neither clearly wins}.
    """
    raw = [r for r in records if r["features"] == "raw" and str(r["probe"]).startswith("linear")]
    if not raw:
        return None
    best = max(raw, key=lambda r: r["accuracy_mean"])
    out: dict[str, Any] = {"best": {"hook": best["hook"], "timestep": best["timestep"],
                                    "accuracy": best["accuracy_mean"], "std": best["accuracy_std"],
                                    "chance": best["chance_mean"]},
                           "baselines": {}, "strongest": None, "margin": None, "wins": True}
    for r in records:
        if r["features"] in baselines and r["probe"] == "linear":
            out["baselines"][r["features"]] = {"accuracy": r["accuracy_mean"], "std": r["accuracy_std"],
                                               "margin": best["accuracy_mean"] - r["accuracy_mean"]}
    out["level"] = False
    if out["baselines"]:
        name = max(out["baselines"], key=lambda k: out["baselines"][k]["accuracy"])
        out["strongest"], out["margin"] = name, out["baselines"][name]["margin"]
        out["wins"] = out["margin"] > 0
        # a margin inside the spread over split seeds is no win either way
        out["level"] = abs(out["margin"]) <= max(best["accuracy_std"], out["baselines"][name]["std"])
    return out
