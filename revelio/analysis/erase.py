"""Concept erasure with SAE latents: pick a concept's latents from a store, ablate them while generating, score it.

**Selection** (SAeUron's score, Cywinski & Deja 2025). For every store image i the SAE encodes
each position of its feature map at the SAE's hook and timestep; a_ij is latent j's mean code
over the positions. Images whose caption holds the concept word (whole word, any case) form
D_c, the others D_!c. With mu_j(D) the mean of a_ij over D:

    score_j = mu_j(D_c) / sum_k mu_k(D_c)  -  mu_j(D_!c) / sum_k mu_k(D_!c)

(the latent's share of all activity on images with the concept minus its share on images
without it). The ``n`` latents of highest score are the concept's.

**Edit**. While the pipeline generates, at every denoiser call inside the step window, the
hooked module's image output x is encoded (z = encode(x), per position) and replaced by

    x' = x + decode(z_edited) - decode(z),   z_edited_j = (1 - strength) * z_j for chosen j

so the SAE's reconstruction error x - decode(z) is kept. strength 1 ablates (sets the codes to
0), strength > 1 scales them negatively (SAeUron's negative multiplier -gamma is strength
1 + gamma), strength 0 changes nothing. The decoder is linear, so the change is
-strength * sum_j z_j * W_dec[j] / norm_scale.

**Steps**. The window [start, end) counts denoising steps, not denoiser calls: a new step begins
when the denoiser's timestep argument changes. Every call of a step inside the window is edited:
under classifier-free guidance both the conditional and the unconditional prediction (one
batched UNet call for tiny-sd; two transformer calls per step for tiny-flux's true CFG).

**Scores** (with the independent judge of ``revelio.zoo.quality``, which names the colour and
shape of an image's largest vivid blob): see ``erasure_scores``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .steering import Steering

# ---------------------------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------------------------


def has_word(caption: str, word: str) -> bool:
    """Whether ``caption`` holds ``word`` as a whole word (case-insensitive; a phrase matches as a phrase)."""
    return re.search(rf"(?<![a-z0-9]){re.escape(word.lower().strip())}(?![a-z0-9])", caption.lower()) is not None


def concept_scores(acts: np.ndarray, with_concept: np.ndarray) -> np.ndarray:
    """SAeUron's score per latent from per-image mean codes ``acts`` (n, d_sae) and a boolean mask (n,)."""
    acts = np.asarray(acts, dtype=np.float64)
    m = np.asarray(with_concept, dtype=bool)
    if acts.ndim != 2 or len(m) != len(acts):
        raise ValueError(f"acts must be (n_images, d_sae) with one flag per image, got {acts.shape} and {m.shape}")
    if m.all() or not m.any():
        raise ValueError(f"the concept is in {int(m.sum())} of {len(m)} images: selection needs images with and "
                         "without it")
    mu_c, mu_n = acts[m].mean(0), acts[~m].mean(0)
    return mu_c / max(mu_c.sum(), 1e-12) - mu_n / max(mu_n.sum(), 1e-12)


def top_latents(scores: np.ndarray, n: int) -> list[int]:
    """The ``n`` latents of highest score (ties: lower index first)."""
    if n < 0:
        raise ValueError(f"number of latents must be >= 0, got {n}")
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores)))
    return [int(j) for j in order[:n]]


def random_latents(n: int, live: np.ndarray, exclude: Sequence[int], seed: int = 0) -> list[int]:
    """``n`` latents drawn (seeded) among the ``live`` ones (fire on the store) that are not in ``exclude``."""
    pool = np.setdiff1d(np.flatnonzero(live), np.asarray(list(exclude), dtype=np.int64))
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} live latents outside the chosen ones; cannot draw {n} random latents")
    return sorted(int(j) for j in np.random.default_rng(seed).choice(pool, size=n, replace=False))


@dataclass
class ConceptStats:
    """Per-image mean codes of store rows and the concept flags that selection reads."""

    acts: np.ndarray  # (n, d_sae) mean code over positions
    with_concept: np.ndarray  # (n,) bool
    concept: str

    @property
    def live(self) -> np.ndarray:
        return self.acts.max(0) > 0

    def scores(self) -> np.ndarray:
        return concept_scores(self.acts, self.with_concept)


def store_concept_stats(store: Any, model: Any, concept: str, rows: Sequence[int] | np.ndarray,
                        max_positions: int = 16384) -> ConceptStats:
    """Mean codes (over positions) of store ``rows`` at the SAE's site, and which captions hold ``concept``."""
    from .feature_maps import encode_tokens, require_spatial, sae_site

    hook, t = sae_site(model)
    rows = np.asarray(rows, dtype=np.int64)
    caps = store.captions
    flags = np.array([has_word(str(caps[r]), concept) for r in rows], dtype=bool)
    if flags.all() or not flags.any():
        raise ValueError(f"{concept!r} is in {int(flags.sum())} of {len(rows)} captions of {store.path}: selecting "
                         "its latents needs images with and without it")
    if store.layout(hook, t) == "NC":
        acts = encode_tokens(model, store.read(hook, t, rows))
    else:
        require_spatial(store, hook, t)
        h, w = store.spatial(hook, t)
        step = max(1, max_positions // (h * w))
        parts = []
        for i in range(0, len(rows), step):
            x, _ = store.tokens(hook, t, rows[i:i + step])
            parts.append(encode_tokens(model, x).reshape(-1, h * w, model.d_sae).mean(1))
        acts = np.concatenate(parts) if parts else np.zeros((0, model.d_sae), np.float32)
    return ConceptStats(acts=acts, with_concept=flags, concept=concept)


# ---------------------------------------------------------------------------------------------------------------
# the edit
# ---------------------------------------------------------------------------------------------------------------


def _timestep(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    t = torch.as_tensor(t)
    return float(t.flatten()[0]) if t.numel() else None


class Erasure(Steering):
    """Context manager: the SAE's hook output gets x + decode(z_edited) - decode(z) at the window's steps.

    ``latents`` are scaled by (1 - ``strength``); ``steps`` = [start, end) denoising steps (None: all).
    ``calls`` counts denoiser calls, ``edits`` the hook outputs edited, ``edited_steps`` their step indices.
    """

    def __init__(self, pipe: Any, model: Any, latents: Sequence[int], strength: float = 1.0,
                 steps: tuple[int, int] | None = None, hook: str | None = None):
        super().__init__(pipe, model, [], hook)
        self.latents = [int(j) for j in latents]
        bad = [j for j in self.latents if not 0 <= j < model.d_sae]
        if bad:
            raise ValueError(f"latents {bad} are out of range for an SAE with d_sae={model.d_sae}")
        if steps is not None and (len(steps) != 2 or not 0 <= steps[0] < steps[1]):
            raise ValueError(f"steps must be [start, end) with 0 <= start < end, got {list(steps)}")
        self.strength = float(strength)
        self.window = None if steps is None else (int(steps[0]), int(steps[1]))
        with torch.no_grad():
            dec = model.W_dec[self.latents].float() / model.norm_scale.float()
        self.directions_matrix = dec  # (L, d_in): decode(e_j) - decode(0)
        self.reset()

    def reset(self) -> None:
        self.denoise_step, self._t, self.calls, self.edits = -1, None, 0, 0
        self.edited_steps: list[int] = []

    def __enter__(self) -> Erasure:
        self.reset()
        return super().__enter__()  # type: ignore[return-value]

    def _on_call(self, module: Any, args: tuple, kwargs: dict) -> None:
        super()._on_call(module, args, kwargs)  # image-token grid of transformer calls
        t = _timestep(args, kwargs)
        if self.denoise_step < 0 or t is None or t != self._t:
            self.denoise_step += 1
        self._t = t
        self.calls += 1

    def active(self) -> bool:
        if not self.latents or self.strength == 0.0:
            return False
        return self.window is None or self.window[0] <= self.denoise_step < self.window[1]

    @torch.no_grad()
    def _on_output(self, module: Any, args: tuple, output: Any) -> None:
        if not self.active():
            return
        x = self.adapter.image_part(output, self.n_img)  # a view into the output: edited in place
        tokens = x.permute(0, 2, 3, 1) if x.ndim == 4 else x  # positions first, channels last
        flat = tokens.reshape(-1, tokens.shape[-1]).float()
        z = self.model.encode(flat)[:, self.latents]
        delta = -(self.strength * z) @ self.directions_matrix.to(z.device)
        tokens.add_(delta.view(tokens.shape).to(x.dtype))
        self.edits += 1
        self.edited_steps.append(self.denoise_step)


@torch.no_grad()
def edit_reference(model: Any, x: torch.Tensor, latents: Sequence[int], strength: float) -> torch.Tensor:
    """x + decode(z_edited) - decode(z) for rows x (N, d_in), computed literally (the naive reference)."""
    z = model.encode(x.float())
    ze = z.clone()
    ze[:, list(latents)] *= 1.0 - strength
    return x.float() + model.decode(ze) - model.decode(z)


# ---------------------------------------------------------------------------------------------------------------
# generation and scores
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int = 20,
                    guidance_scale: float = 5.0, negative: str = "", size: int = 64,
                    batch_size: int = 16) -> list[np.ndarray]:
    """One uint8 RGB image per (prompt, seed) with CFG against ``negative`` (the empty prompt by default).

    As ``revelio.zoo.quality.generate`` (tiny-flux: true CFG), with the negative prompt exposed.
    """
    from extraction.adapters import get_adapter

    ad = get_adapter(pipe)
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch_size):
        p, sd = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
        kw = dict(height=size, width=size, num_inference_steps=steps, output_type="np",
                  generator=[torch.Generator("cpu").manual_seed(int(s)) for s in sd])
        kw.update(ad.generation_kwargs(guidance_scale, batch=len(p), negative=negative))
        imgs = pipe(prompt=p, **kw).images
        out += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in imgs]
    return out


def concept_attribute(concept: str) -> int | None:
    """Which judged attribute names ``concept``: 0 (a shapes colour), 1 (a shapes shape) or None (neither)."""
    from ..datasets.shapes import COLORS, SHAPES

    c = concept.lower().strip()
    return 0 if c in COLORS else 1 if c in SHAPES else None


def default_prompts(concept: str) -> tuple[list[str], list[str]]:
    """(prompts with, prompts without) the concept: single shapes objects in the caption wording.

    A colour: "a <colour> <shape>" for every shape, and each other colour with one shape (rotating);
    a shape likewise with the roles swapped.
    """
    from ..datasets.shapes import COLORS, SHAPES, phrase

    attr = concept_attribute(concept)
    if attr is None:
        raise ValueError(f"{concept!r} is not a shapes colour or shape; pass with_prompts and without_prompts")
    c = concept.lower().strip()
    colours = list(COLORS)
    if attr == 0:
        others = [k for k in colours if k != c]
        return ([phrase(c, s) for s in SHAPES],
                [phrase(o, SHAPES[i % len(SHAPES)]) for i, o in enumerate(others)])
    others = [s for s in SHAPES if s != c]
    return ([phrase(k, c) for k in colours], [phrase(colours[i % len(colours)], o) for i, o in enumerate(others)])


Label = tuple[str | None, str | None]


def erasure_scores(concept: str, base_with: Sequence[Label], edit_with: Sequence[Label],
                   base_without: Sequence[Label], edit_without: Sequence[Label]) -> dict[str, Any]:
    """Judged scores of one intervention from the judge's (colour, shape) of each image, unedited vs edited.

    * ``erasure``: among the prompts with the concept whose unedited image the judge names the concept,
      the fraction whose edited image it no longer names it (``n_shown`` such images);
    * ``erasure_all``: fraction of all edited images of prompts with the concept not named the concept;
    * ``retention``: prompts without the concept whose judged (colour, shape) is unchanged by the edit;
      ``retention_attr``: the same for the concept's attribute alone (colour for a colour concept);
    * ``fidelity``: fraction of all edited images in which the judge still finds an object
      (``fidelity_with`` / ``fidelity_without``: of the prompts with / without the concept);
    * ``fidelity_base``: the same for the unedited images.
    None where a share has no images (or for judged scores of a concept the judge cannot name).
    """
    attr = concept_attribute(concept)
    c = concept.lower().strip()

    def frac(xs: list[bool]) -> float | None:
        return float(np.mean(xs)) if xs else None

    shown = [e for b, e in zip(base_with, edit_with) if attr is not None and b[attr] == c]
    edits = list(edit_with) + list(edit_without)
    return {
        "erasure": frac([e[attr] != c for e in shown]) if attr is not None else None,
        "n_shown": len(shown), "n_with": len(edit_with), "n_without": len(edit_without),
        "erasure_all": frac([e[attr] != c for e in edit_with]) if attr is not None else None,
        "retention": frac([tuple(b) == tuple(e) for b, e in zip(base_without, edit_without)]),
        "retention_attr": frac([b[attr] == e[attr] for b, e in zip(base_without, edit_without)])
        if attr is not None else None,
        "fidelity": frac([e[0] is not None for e in edits]),
        "fidelity_with": frac([e[0] is not None for e in edit_with]),
        "fidelity_without": frac([e[0] is not None for e in edit_without]),
        "fidelity_base": frac([b[0] is not None for b in list(base_with) + list(base_without)]),
    }


def mean_abs_change(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Mean |pixel change| (0-255 scale) between two lists of uint8 images."""
    if not a:
        return float("nan")
    return float(np.mean([np.abs(x.astype(np.float32) - y.astype(np.float32)).mean() for x, y in zip(a, b)]))


# ---------------------------------------------------------------------------------------------------------------
# the sweep: number of latents x strength, beside random latents and the negative prompt
# ---------------------------------------------------------------------------------------------------------------


def erasure_sweep(pipe: Any, model: Any, stats: ConceptStats, judge: Any, with_prompts: Sequence[str],
                  without_prompts: Sequence[str], seeds: Sequence[int], n_latents: Sequence[int],
                  strengths: Sequence[float], window: tuple[int, int] | None = None, steps: int = 20,
                  guidance_scale: float = 5.0, size: int = 64, random_baseline: bool = True,
                  negative_baseline: bool = True, random_seed: int = 0, hook: str | None = None,
                  log: Any = print) -> dict[str, Any]:
    """Generate every (prompt, seed) unedited, then under each intervention; judge and score each one.

    Returns ``{"selected": [...], "scores": [...], "rows": [...], "images": {...}}``: one row per
    intervention (``method``: sae | random | negative_prompt, ``n``, ``strength``, the scores of
    ``erasure_scores`` and the mean |pixel change| on prompts with and without the concept).
    """
    pw = [p for p in with_prompts for _ in seeds]
    po = [p for p in without_prompts for _ in seeds]
    sw = [s for _ in with_prompts for s in seeds]
    so = [s for _ in without_prompts for s in seeds]
    prompts, pseeds = pw + po, sw + so
    nw = len(pw)
    scores = stats.scores()
    order = top_latents(scores, max(n_latents) if n_latents else 0)

    def gen(negative: str = "") -> list[np.ndarray]:
        return generate_images(pipe, prompts, pseeds, steps, guidance_scale, negative=negative, size=size)

    def row(method: str, n: int, strength: float | None, latents: list[int], imgs: list[np.ndarray]) -> dict:
        lab = [judge.judge(im) for im in imgs]
        r = {"method": method, "n": n, "strength": strength, "latents": latents,
             **erasure_scores(stats.concept, base_lab[:nw], lab[:nw], base_lab[nw:], lab[nw:]),
             "pixel_change_with": mean_abs_change(base[:nw], imgs[:nw]),
             "pixel_change_without": mean_abs_change(base[nw:], imgs[nw:])}
        log(f"  {method:<15} n={n:<3} strength={'-' if strength is None else f'{strength:g}':<4} "
            f"erasure {_f(r['erasure'])} (of {r['n_shown']}), retention {_f(r['retention'])} "
            f"({['colour', 'shape', 'attribute'][_attr_index(stats.concept)]} kept "
            f"{_f(r['retention_attr'])}), object found {_f(r['fidelity_with'])} / {_f(r['fidelity_without'])}, "
            f"|pixel change| without "
            f"{r['pixel_change_without']:.1f}/255")
        return r

    base = gen()
    base_lab = [judge.judge(im) for im in base]
    images: dict[str, list[np.ndarray]] = {"none": base}
    rows = []
    for n in n_latents:
        for s in strengths:
            lat = order[:n]
            with Erasure(pipe, model, lat, s, window, hook):
                imgs = gen()
            images[f"sae n={n} s={s:g}"] = imgs
            rows.append(row("sae", n, s, lat, imgs))
            if random_baseline and n > 0:
                rl = random_latents(n, stats.live, order[:n], seed=random_seed + n)
                with Erasure(pipe, model, rl, s, window, hook):
                    rimgs = gen()
                rows.append(row("random", n, s, rl, rimgs))
    if negative_baseline:
        imgs = gen(negative=stats.concept)
        images["negative_prompt"] = imgs
        rows.append(row("negative_prompt", 0, None, [], imgs))
    base_row = erasure_scores(stats.concept, base_lab[:nw], base_lab[:nw], base_lab[nw:], base_lab[nw:])
    return {"selected": order, "scores": [float(scores[j]) for j in order], "rows": rows, "images": images,
            "prompts": prompts, "seeds": pseeds, "n_with": nw, "unedited": base_row,
            "base_labels": base_lab}


def _attr_index(concept: str) -> int:
    a = concept_attribute(concept)
    return 2 if a is None else a


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep as a markdown table (one line per intervention)."""
    head = ("| method | latents | strength | erasure | of | erasure (all) | retention | retention (attribute) "
            "| fidelity with / without | abs pixel change with / without |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        st = "-" if r["strength"] is None else f"{r['strength']:g}"
        lines.append(f"| {r['method']} | {r['n']} | {st} "
                     f"| {_f(r['erasure'])} | {r['n_shown']} | {_f(r['erasure_all'])} | {_f(r['retention'])} "
                     f"| {_f(r['retention_attr'])} | {_f(r['fidelity_with'])} / {_f(r['fidelity_without'])} "
                     f"| {r['pixel_change_with']:.1f} / {r['pixel_change_without']:.1f} |")
    return "\n".join(lines) + "\n"


def curve_figure(rows: Sequence[dict[str, Any]], concept: str, title: str = "") -> Any:
    """Removal (erasure) vs retention, one point per intervention; SAE latents joined by strength per n."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4))
    sae_rows = [r for r in rows if r["method"] == "sae" and r["erasure"] is not None]
    for n in sorted({r["n"] for r in sae_rows}):
        pts = sorted((r for r in sae_rows if r["n"] == n), key=lambda r: r["strength"])
        ax.plot([r["retention"] for r in pts], [r["erasure"] for r in pts], "o-", label=f"SAE, {n} latents")
        for r in pts:
            ax.annotate(f"{r['strength']:g}", (r["retention"], r["erasure"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    rnd = [r for r in rows if r["method"] == "random" and r["erasure"] is not None]
    if rnd:
        ax.scatter([r["retention"] for r in rnd], [r["erasure"] for r in rnd], marker="x", c="grey",
                   label="random latents (same n, strength)")
    neg = [r for r in rows if r["method"] == "negative_prompt" and r["erasure"] is not None]
    if neg:
        ax.scatter([r["retention"] for r in neg], [r["erasure"] for r in neg], marker="*", s=150, c="black",
                   label=f"negative prompt '{concept}'")
    ax.set_xlabel("retention (prompts without the concept: judged colour+shape unchanged)")
    ax.set_ylabel(f"erasure ('{concept}' no longer judged)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    else:  # no image showed the concept without intervention: erasure is undefined everywhere
        ax.text(0.5, 0.5, "no unedited image shows the concept", ha="center", fontsize=8, transform=ax.transAxes)
    ax.set_title(title or f"erasing '{concept}' (labels: strength)", fontsize=9)
    return fig
