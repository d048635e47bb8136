"""``revelio erase``: erase a concept by ablating its SAE latents while generating, scored by the shapes judge."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cli import command
from ..config import field, to_dict
from .compare_browse_steer import SourceConfig, first_rows, load_model_pipeline, open_sources


@dataclass
class EraseConfig:
    source: SourceConfig = field(default_factory=SourceConfig, help="")
    concept: str = field("blue", help="concept word: a shapes colour or shape (judged), or any caption word "
                                      "(with_prompts/without_prompts then needed; pixel scores only)")
    images: int | None = field(512, min=1, help="store images whose codes select the latents (first done rows; "
                                                "null: all)")
    n_latents: list[int] = field(default_factory=lambda: [4], nonempty=True, min=0,
                                 help="numbers of top-scored latents to edit (a list: a sweep)")
    strengths: list[float] = field(default_factory=lambda: [1.0], nonempty=True, min=0,
                                   help="codes of the chosen latents are scaled by (1 - strength): 1 ablates, "
                                        ">1 scales negatively, 0 does nothing (a list: a sweep)")
    window: list[int] | None = field(None, nonempty=True, min=0,
                                     help="[start, end) denoising steps edited (null: all); steps, not denoiser "
                                          "calls (true CFG calls the transformer twice a step, both are edited)")
    with_prompts: list[str] | None = field(None, nonempty=True, help="prompts holding the concept (null: every "
                                                                     "shapes object of that colour/shape)")
    without_prompts: list[str] | None = field(None, nonempty=True, help="prompts without it (null: one object "
                                                                        "per other colour/shape)")
    seeds: list[int] = field(default_factory=lambda: [0, 1], nonempty=True, help="generation seeds per prompt")
    inference_steps: int = field(20, min=1, help="denoising steps")
    guidance_scale: float = field(5.0, help="classifier-free guidance scale (tiny-flux: true CFG)")
    size: int = field(64, min=8, help="image side in pixels")
    baselines: bool = field(True, help="also run the random-latent (same n, strength) and negative-prompt baselines")
    judge_images: int = field(600, min=20, help="real shapes images the judge's shape classifier trains on "
                                                "(a third more validate it)")
    seed: int = field(0, help="seed of the random-latent baseline and the judge")
    out: str = field("runs/erase", help="output folder: erase.json, table.md, curve.png, examples.png")


@command("erase", EraseConfig)
def erase_cmd(cfg: EraseConfig) -> dict[str, Any]:
    """Erase a concept: ablate its top SAE latents (SAeUron score) while generating; judged erasure vs retention."""
    from ..analysis.erase import (concept_attribute, curve_figure, default_prompts, erasure_sweep,
                                  store_concept_stats, table_markdown)
    from ..analysis.feature_maps import sae_site
    from ..files import write_text_atomic
    from ..viz import save_figure
    from ..zoo.quality import ShapesJudge

    if cfg.window is not None and (len(cfg.window) != 2 or cfg.window[0] >= cfg.window[1]):
        raise ValueError(f"window must be [start, end) with start < end, got {cfg.window}")
    if (cfg.with_prompts is None) != (cfg.without_prompts is None) and concept_attribute(cfg.concept) is None:
        raise ValueError(f"{cfg.concept!r} is not a shapes word: pass both with_prompts and without_prompts")
    if cfg.with_prompts is None or cfg.without_prompts is None:
        dw, do = default_prompts(cfg.concept)
    with_p = cfg.with_prompts if cfg.with_prompts is not None else dw
    without_p = cfg.without_prompts if cfg.without_prompts is not None else do
    t0 = time.perf_counter()
    model, store = open_sources(cfg.source)
    hook, t = sae_site(model)
    if max(cfg.n_latents) > model.d_sae:
        raise ValueError(f"n_latents {max(cfg.n_latents)} exceeds the SAE's d_sae={model.d_sae}")
    with store:
        stats = store_concept_stats(store, model, cfg.concept, first_rows(store, cfg.images))
        pipe = load_model_pipeline(cfg.source, store)
        store_path = str(store.path)
    print(f"erase: '{cfg.concept}' in {int(stats.with_concept.sum())} of {len(stats.with_concept)} store captions; "
          f"SAE {hook} t={t}, {model.d_sae} latents ({int(stats.live.sum())} live)")
    judge = ShapesJudge.fit(n_train=cfg.judge_images, n_val=max(10, cfg.judge_images // 3), seed=cfg.seed)
    res = erasure_sweep(pipe, model, stats, judge, with_p, without_p, cfg.seeds, cfg.n_latents, cfg.strengths,
                        window=tuple(cfg.window) if cfg.window is not None else None, steps=cfg.inference_steps,
                        guidance_scale=cfg.guidance_scale, size=cfg.size, random_baseline=cfg.baselines,
                        negative_baseline=cfg.baselines, random_seed=cfg.seed)
    out = Path(cfg.out)
    summary = {"concept": cfg.concept, "sae": str(cfg.source.sae), "store": store_path, "hook": hook,
               "timestep": t, "model": type(pipe).__name__, "selected_latents": res["selected"],
               "selected_scores": res["scores"], "with_prompts": list(with_p), "without_prompts": list(without_p),
               "unedited": res["unedited"], "rows": res["rows"],
               "judge": {"real_colour_accuracy": judge.real_colour_accuracy,
                         "real_shape_accuracy": judge.real_shape_accuracy},
               "seconds": round(time.perf_counter() - t0, 1), "config": to_dict(cfg)}
    title = f"{cfg.source.model or summary['model']}: erasing '{cfg.concept}' at {hook} (SAE t={t})"
    paths = {"json": write_text_atomic(out / "erase.json", json.dumps(summary, indent=2, default=_plain)),
             "table": write_text_atomic(out / "table.md", table_markdown(res["rows"])),
             "curve": save_figure(curve_figure(res["rows"], cfg.concept, title), out / "curve.png"),
             "examples": save_figure(_examples(res, cfg), out / "examples.png")}
    u = res["unedited"]
    print(f"erase: unedited: judge finds an object in {u['fidelity_base']:.0%}; top latents "
          f"{res['selected'][:8]}; wrote {', '.join(str(p) for p in paths.values())}")
    return {"paths": paths, "summary": summary, "rows": res["rows"]}


def _plain(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _examples(res: dict[str, Any], cfg: EraseConfig) -> Any:
    """Rows: unedited, the SAE edit of best erasure + retention, negative prompt; columns: prompts (first seed)."""
    import matplotlib.pyplot as plt

    imgs = res["images"]
    sae_rows = [r for r in res["rows"] if r["method"] == "sae"]
    best = max(sae_rows, key=lambda r: ((r["erasure"] or 0.0) + (r["retention"] or 0.0), -r["pixel_change_without"]),
               default=None)
    keys = ["none"] + ([f"sae n={best['n']} s={best['strength']:g}"] if best is not None else []) + \
        (["negative_prompt"] if "negative_prompt" in imgs else [])
    cols = list(range(0, len(res["prompts"]), len(cfg.seeds)))[:12]
    fig, axes = plt.subplots(len(keys), len(cols), figsize=(1.1 * len(cols), 1.25 * len(keys)), squeeze=False)
    for i, k in enumerate(keys):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            ax.imshow(imgs[k][c])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(res["prompts"][c].split(" ", 1)[1], fontsize=6)
            if j == 0:
                ax.set_ylabel(k, fontsize=6)
    return fig
