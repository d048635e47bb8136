"""The feature browser: per latent, its top images with heat maps, histogram, labels and best concepts.

``FeatureBrowser`` computes everything once (``latent_stats`` plus, where the data set has
masks or a compare run is given, an ``AlignmentTable``) and renders it two ways from the same
HTML fragments: inside a notebook (``show`` / ``widget`` with ipywidgets) and as a static
dashboard folder (``export``): ``index.html`` listing latents sortable by frequency, purity or
alignment, and one page per latent. Images are embedded as base64 PNG, so the folder opens
in any browser from disk, without a server.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..files import write_text_atomic
from .alignment import AlignmentTable
from .stats import LatentStats, latent_stats, timestep_profile

SORT_KEYS = ("frequency", "purity", "alignment", "index")
PAGE_SIZE = 50  # latents per page of the index table
INTERVALS = 3  # activation intervals of the example rows below the top images (as sae_vis)
PER_INTERVAL = 4  # images shown per interval

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:22px 0 8px} h3{font-size:14px;margin:14px 0 6px}
.meta{color:#5b6475;font-size:13px} .desc{font-size:15px;margin:6px 0 2px}
table{border-collapse:collapse;font-size:13px;background:#fff} th,td{border-bottom:1px solid #e3e6ec;padding:5px 9px;text-align:left}
th{background:#eef1f6;cursor:pointer;user-select:none;position:sticky;top:0} tr:hover td{background:#f4f7ff}
td.num{text-align:right;font-variant-numeric:tabular-nums} img.thumb{width:44px;height:44px;image-rendering:pixelated;border-radius:3px}
.grid{display:flex;flex-wrap:wrap;gap:10px} .card{background:#fff;border:1px solid #e3e6ec;border-radius:6px;padding:6px;width:150px;font-size:11px}
.card img{width:150px;height:150px;image-rendering:pixelated;border-radius:4px} .pair{display:flex;gap:4px}
.pair img{width:73px;height:73px} .bar{background:#4c78d8;height:12px;border-radius:2px;display:inline-block}
.panel{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start} a{color:#2456c5;text-decoration:none}
.cbar{display:inline-flex;align-items:center;gap:6px;font-size:11px;color:#5b6475}
.cbar span.g{display:inline-block;width:160px;height:10px;border-radius:2px}
.nav{display:flex;gap:16px;margin:0 0 10px;font-size:13px} .tools{margin:10px 0;display:flex;gap:14px;align-items:center}
input#search{font-size:14px;padding:5px 8px;width:280px} button{font-size:13px;padding:3px 10px}
dl.defs{font-size:12px;color:#5b6475;margin:8px 0} dl.defs dt{font-weight:600;display:inline} dl.defs dd{display:inline;margin:0 12px 0 4px}
"""

# The index: one JSON row per latent, rendered PAGE_SIZE at a time; search filters, a header click sorts.
INDEX_JS = """
const rows=JSON.parse(document.getElementById('latents').textContent);
const cols=[['latent','id',1],['top image',null,0],['frequency','freq',0],['images','imgfreq',0],['purity','purity',0],
 ['entropy','entropy',1],['best concept','concept',1],['IoU','iou',0],['description','desc',1]];
let key=document.body.dataset.sort,asc=key==='id',page=0,shown=rows;
const fmt=(v,d)=>v===null?'-':(Math.abs(v)<0.5*Math.pow(10,-d)?0:v).toFixed(d);
function render(){
 const q=document.getElementById('search').value.trim().toLowerCase();
 shown=rows.filter(r=>!q||(/^[0-9]+$/.test(q)?String(r.id)===q:((r.concept||'').toLowerCase().includes(q)
  ||(r.label||'').toLowerCase().includes(q)||r.desc.toLowerCase().includes(q))));
 shown.sort((a,b)=>{const x=a[key],y=b[key];if(x===y)return a.id-b.id;if(x===null)return 1;if(y===null)return -1;
  return (x>y?1:-1)*(asc?1:-1)});
 const n=shown.length,pages=Math.max(1,Math.ceil(n/PAGE)); page=Math.min(page,pages-1);
 const part=shown.slice(page*PAGE,(page+1)*PAGE);
 document.getElementById('body').innerHTML=part.map(r=>'<tr data-id="'+r.id+'"><td>'+(r.page?'<a href="latent_'
  +String(r.id).padStart(5,'0')+'.html">'+r.id+'</a>':r.id)+'</td><td>'+(r.thumb?'<img class="thumb" src="'+r.thumb+'">':'')
  +'</td><td class="num">'+fmt(r.freq,4)+'</td><td class="num">'+(r.imgfreq===null?'-':(100*r.imgfreq).toFixed(1)+'%')
  +'</td><td class="num">'+fmt(r.purity,3)+'</td><td class="num">'+fmt(r.entropy,3)+'</td><td>'+(r.concept||'-')
  +'</td><td class="num">'+fmt(r.iou,3)+'</td><td>'+r.desc+'</td></tr>').join('');
 document.getElementById('count').textContent=n?('latents '+(page*PAGE+1)+'-'+(page*PAGE+part.length)+' of '+n
  +(n<rows.length?' matching (of '+rows.length+')':'')):'no latent matches';
 document.getElementById('sorted').textContent=cols.find(c=>c[1]===key)[0]+(asc?' (ascending)':' (descending)');
 document.getElementById('prev').disabled=page===0; document.getElementById('next').disabled=page>=pages-1;}
document.querySelectorAll('th[data-key]').forEach(th=>th.addEventListener('click',()=>{
 const k=th.dataset.key; if(k===key)asc=!asc; else {key=k;asc=th.dataset.asc==='1';} page=0; render();}));
document.getElementById('search').addEventListener('input',()=>{page=0;render();});
document.getElementById('prev').addEventListener('click',()=>{page--;render();});
document.getElementById('next').addEventListener('click',()=>{page++;render();});
render();
"""

SORT_FIELD = {"frequency": "freq", "purity": "purity", "alignment": "iou", "index": "id"}


def png_data_uri(image: Image.Image | np.ndarray) -> str:
    """An image as a ``data:image/png;base64,...`` URI (embeds it in HTML)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: float | None, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals; '-' for None/NaN; never '-0.000'."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    v = float(v)
    return f"{0.0 if abs(v) < 0.5 * 10 ** -digits else v:.{digits}f}"


def _num(v: float | None) -> float | None:
    """A JSON number (None for NaN)."""
    return None if v is None or not np.isfinite(v) else float(v)


def colourbar_html(vmax: float, what: str, cmap: str = "jet", vmin: float = 0.0) -> str:
    """An HTML colourbar of ``cmap`` from ``vmin`` to ``vmax`` with the normalisation spelled out."""
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    stops = ",".join(matplotlib.colors.to_hex(cm(i / 8)) for i in range(9))
    return (f"<div class='cbar'><span>{_fmt(vmin, 2)}</span><span class='g' style='background:linear-gradient(to right,"
            f"{stops})'></span><span>{vmax:.3g}</span><span>{html.escape(what)}</span></div>")


def _page(title: str, body: str, script: str = "", attrs: str = "") -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<link rel='icon' href='data:,'><style>{CSS}</style></head><body{attrs}>{body}"
            f"{f'<script>{script}</script>' if script else ''}</body></html>")


class FeatureBrowser:
    """Browse the latents of ``model`` on ``store`` (see module docstring).

    ``rows``: store rows to use (default: all done rows). ``alignment``: a finished
    ``AlignmentTable`` (e.g. from ``revelio compare``); by default one is computed against the
    data set's ground-truth masks when it has them (``align=False`` skips it).
    """

    def __init__(self, store: Any, model: Any, rows: Sequence[int] | None = None, dataset: Any = None,
                 alignment: AlignmentTable | None = None, align: bool = True, top_k: int = 8, eval_size: int = 32,
                 progress: bool = True):
        from .feature_maps import sae_site, store_dataset

        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.store, self.model, self.top_k, self.progress = store, model, top_k, progress
        self.hook, self.t = sae_site(model)
        self.dataset = dataset if dataset is not None else store_dataset(store)
        self.stats: LatentStats = latent_stats(store, model, rows, progress=progress)
        # when along denoising each latent is active: every timestep the store holds for the SAE's hook
        self.t_profile = timestep_profile(store, model, self.stats.rows, progress=progress)
        self.class_names = list(getattr(self.dataset, "class_names", []) or [])
        self._samples: dict[int, Any] = {}
        self._top: dict[int, list[tuple[int, np.ndarray, float]]] = {}
        self._scores: dict[str, tuple[list[str], np.ndarray]] = {}
        self._intervals: dict[int, list[tuple[float, float, list[tuple[int, np.ndarray, float]]]]] = {}
        self.alignment = alignment
        if alignment is None and align:
            self.alignment = self._mask_alignment(eval_size)
        # label purity / entropy: the labels (the largest object's class) of the top-k images
        self.label_purity, self.entropy = self.stats.purity_entropy(top_k)
        # purity: per object mask when the data set has masks (see mask_purity), else the label purity
        self.purity, self.purity_concept, self.purity_kind = self.label_purity, [None] * self.stats.d_sae, "label"
        rows = self.stats.rows
        if len(rows) and self.samples(rows[:1])[0].masks is not None:
            self.purity, self.purity_concept = self.mask_purity()
            self.purity_kind = "mask"

    # ---- data ---------------------------------------------------------------------------
    def samples(self, rows: Sequence[int]) -> list[Any]:
        """Data-set samples of store ``rows`` (cached)."""
        from .feature_maps import store_samples

        todo = sorted({int(r) for r in rows} - set(self._samples))
        if todo:
            for r, s in zip(todo, store_samples(self.store, todo, self.dataset)):
                self._samples[r] = s
        return [self._samples[int(r)] for r in rows]

    def _mask_alignment(self, eval_size: int) -> AlignmentTable | None:
        from .alignment import align_store

        rows = self.stats.rows
        if not len(rows) or self.samples(rows[:1])[0].masks is None:
            return None
        return align_store(self.store, self.model, rows, self.samples(rows), eval_size=eval_size,
                           progress=self.progress)

    def _reference(self) -> str | None:
        if self.alignment is None or not self.alignment.concepts:
            return None
        has_mask = any(r.n_images["mask"] for r in self.alignment.concepts.values())
        return "mask" if has_mask else "saliency"

    def concept_scores(self, metric: str = "iou") -> tuple[list[str], np.ndarray]:
        """(concepts, (n_concepts, d_sae) mean ``metric``) against masks where known, else saliency maps (cached)."""
        from .alignment import METRICS

        if metric not in self._scores:
            ref = self._reference()
            names = [] if ref is None else [c for c, r in self.alignment.concepts.items() if r.n_images[ref]]
            mat = np.stack([self.alignment.means(c, ref)[METRICS.index(metric)] for c in names]) if names \
                else np.zeros((0, self.stats.d_sae))
            self._scores[metric] = (names, mat)
        return self._scores[metric]

    def best_concepts(self, latent: int, metric: str = "iou", top: int = 3) -> list[tuple[str, float]]:
        """[(concept, mean score)] the latent matches best (against masks where known, else saliency maps)."""
        names, mat = self.concept_scores(metric)
        col = mat[:, latent] if len(names) else np.zeros(0)
        order = [i for i in np.argsort(-np.nan_to_num(col, nan=-np.inf), kind="stable") if not np.isnan(col[i])]
        return [(names[i], float(col[i])) for i in order[:top]]

    def alignment_score(self) -> np.ndarray:
        """(d_sae,) each latent's best concept score (NaN without alignment)."""
        names, mat = self.concept_scores()
        if not len(names) or np.all(np.isnan(mat)):
            return np.full(self.stats.d_sae, np.nan)
        return np.nanmax(np.where(np.isnan(mat), -np.inf, mat), axis=0)

    def order(self, by: str = "frequency", include_dead: bool = False) -> list[int]:
        """Latent ids sorted by ``by`` (descending; NaN last); dead latents (never fire here) left out by default."""
        if by not in SORT_KEYS:
            raise ValueError(f"sort key {by!r} is not one of {', '.join(SORT_KEYS)}")
        ids = np.arange(self.stats.d_sae)
        if by != "index":
            key = {"frequency": self.stats.frequency, "purity": self.purity, "alignment": self.alignment_score()}[by]
            ids = np.argsort(-np.nan_to_num(key, nan=-np.inf), kind="stable")
        alive = self.stats.image_frequency > 0
        return [int(j) for j in ids if include_dead or alive[j]]

    def interval_indices(self, latent: int) -> list[tuple[float, float, np.ndarray]]:
        """Activation-interval examples (as sae_vis): the latent's firing images outside its top-k, split into
        INTERVALS equal-width intervals of peak activation (lo, hi] from 0 to the top peak, up to PER_INTERVAL
        images each (spread over the interval's images by rank); highest interval first."""
        col = self.stats.peak[:, latent]
        top = set(self.stats.top_images(latent, self.top_k).tolist())
        hi = float(col.max()) if len(col) else 0.0
        out = []
        if hi <= 0:
            return out
        edges = np.linspace(0.0, hi, INTERVALS + 1)
        for i in reversed(range(INTERVALS)):
            inside = np.flatnonzero((col > edges[i]) & (col <= edges[i + 1]))
            inside = np.array([j for j in inside[np.argsort(-col[inside], kind="stable")] if j not in top], dtype=np.int64)
            if len(inside) > PER_INTERVAL:
                inside = inside[np.linspace(0, len(inside) - 1, PER_INTERVAL).round().astype(int)]
            out.append((float(edges[i]), float(edges[i + 1]), inside))
        return out

    def prefetch(self, latents: Sequence[int], chunk: int = 16) -> None:
        """Compute the maps of the top and interval images of ``latents`` (chunk latents at a time, the images of
        a chunk encoded once) into the caches behind ``top_maps`` / ``interval_maps``."""
        from .feature_maps import store_feature_maps

        todo = [int(j) for j in latents if int(j) not in self._top]
        for c0 in range(0, len(todo), chunk):
            part = todo[c0:c0 + chunk]
            top = {j: self.stats.top_images(j, self.top_k) for j in part}
            inter = {j: self.interval_indices(j) for j in part}
            idx = np.unique(np.concatenate([top[j] for j in part] + [i for j in part for *_, i in inter[j]]
                                           + [np.zeros(0, dtype=np.int64)]).astype(np.int64))
            if not len(idx):
                for j in part:
                    self._top[j], self._intervals[j] = [], [(lo, hi, []) for lo, hi, _ in inter[j]]
                continue
            maps = store_feature_maps(self.store, self.model, self.stats.rows[idx], latents=part)  # rows increase
            where = {int(i): n for n, i in enumerate(idx)}
            for m, j in enumerate(part):
                pick = lambda ii: [(int(self.stats.rows[i]), maps[where[int(i)], m],  # noqa: E731
                                    float(self.stats.peak[i, j])) for i in ii]
                self._top[j] = pick(top[j])
                self._intervals[j] = [(lo, hi, pick(ii)) for lo, hi, ii in inter[j]]

    def top_maps(self, latent: int) -> list[tuple[int, np.ndarray, float]]:
        """(store row, (h, w) map, peak) of the latent's top images (cached)."""
        self.stats._check(latent)
        self.prefetch([latent])
        return self._top[latent]

    def interval_maps(self, latent: int) -> list[tuple[float, float, list[tuple[int, np.ndarray, float]]]]:
        """[(lo, hi, [(store row, map, peak)])] of ``interval_indices`` (cached)."""
        self.stats._check(latent)
        self.prefetch([latent])
        return self._intervals[latent]

    def mask_purity(self) -> tuple[np.ndarray, list[str | None]]:
        """(d_sae,) purity per object mask and the concept it is measured for.

        For each top-k image, the latent's peak position (argmax of its map) falls inside some objects' masks
        (their colour and shape words) or the background. Purity is the share of the top images whose peak lies
        inside a mask of the latent's commonest such concept; a latent that always peaks on the blue object has
        purity 1 whatever the largest object is. NaN for latents that never fire.
        """
        pur, names = np.full(self.stats.d_sae, np.nan), [None] * self.stats.d_sae
        alive = [j for j in range(self.stats.d_sae) if self.stats.image_frequency[j] > 0]
        self.prefetch(alive)
        for j in alive:
            hits: dict[str, int] = {}
            top = self._top[j]
            for row, heat, _ in top:
                smp = self.samples([row])[0]
                H, W = np.asarray(smp.image).shape[:2]
                y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
                py, px = min(H - 1, int((y + 0.5) * H / heat.shape[0])), min(W - 1, int((x + 0.5) * W / heat.shape[1]))
                for c, m in (smp.masks or {}).items():
                    if " " not in c and bool(np.asarray(m)[py, px]):
                        hits[c] = hits.get(c, 0) + 1
            if top and hits:
                best = max(sorted(hits), key=lambda c: hits[c])
                pur[j], names[j] = hits[best] / len(top), best
            elif top:
                pur[j] = 0.0
        return pur, names

    # ---- HTML ---------------------------------------------------------------------------
    def _label(self, y: int) -> str:
        return self.class_names[y] if 0 <= y < len(self.class_names) else str(y)

    def _histogram_svg(self, latent: int, width: int = 320, height: int = 160) -> str:
        """The latent's peak-activation histogram as inline SVG with labelled axes (count of images vs peak)."""
        counts, edges = self.stats.histogram(latent)
        top = max(int(counts.max()), 1)
        left, bottom = 34, 34
        plot_w, plot_h = width - left - 6, height - bottom - 6
        bw = plot_w / len(counts)
        bars = "".join(f"<rect x='{left + i * bw:.1f}' y='{6 + plot_h - plot_h * c / top:.1f}' width='{max(bw - 1, 1):.1f}' "
                       f"height='{plot_h * c / top:.1f}' fill='#4c78d8'><title>{edges[i]:.3g}-{edges[i + 1]:.3g}: "
                       f"{int(c)} images</title></rect>" for i, c in enumerate(counts))
        y0 = 6 + plot_h
        ticks = "".join(f"<line x1='{left - 3}' y1='{y0 - plot_h * v / top:.1f}' x2='{left}' y2='{y0 - plot_h * v / top:.1f}' "
                        f"stroke='#888'/><text x='{left - 5}' y='{y0 - plot_h * v / top + 3:.1f}' text-anchor='end'>{v}</text>"
                        for v in sorted({0, top // 2, top}))
        return (f"<svg width='{width}' height='{height}' font-size='10' font-family='sans-serif'>{bars}"
                f"<line x1='{left}' y1='{y0}' x2='{left + plot_w}' y2='{y0}' stroke='#888'/>"
                f"<line x1='{left}' y1='6' x2='{left}' y2='{y0}' stroke='#888'/>{ticks}"
                f"<text x='{left}' y='{y0 + 12}'>{edges[0]:.3g}</text>"
                f"<text x='{left + plot_w}' y='{y0 + 12}' text-anchor='end'>{edges[-1]:.3g}</text>"
                f"<text x='{left + plot_w / 2}' y='{height - 4}' text-anchor='middle'>peak activation per image "
                f"(images where it fires)</text>"
                f"<text transform='translate(10,{6 + plot_h / 2}) rotate(-90)' text-anchor='middle'>images</text></svg>")

    def _timestep_svg(self, latent: int, width: int = 320, height: int = 140) -> str:
        """The latent's mean per-image peak activation at each stored timestep of its hook (inline SVG bars, the
        SAE's own timestep(s) highlighted), with the share of images where it fires under each bar."""
        ts = sorted(self.t_profile)
        if not ts:
            return "<i>no other timestep stored for this hook</i>"
        vals = [float(self.t_profile[t]["mean_peak"][latent]) for t in ts]
        freq = [float(self.t_profile[t]["image_frequency"][latent]) for t in ts]
        own = {int(t) for t in (getattr(self.model, "timesteps", None) or [])} or {int(self.t)}
        vmax = max(vals) or 1.0
        left, bottom, top = 44, 34, 12
        bw = (width - left - 8) / len(ts)
        parts = [f"<svg class='tstrip' width='{width}' height='{height}' role='img' "
                 f"aria-label='mean peak activation per timestep'>",
                 f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='#888'/>",
                 f"<text x='{left - 4}' y='{top + 4}' font-size='9' text-anchor='end'>{vmax:.3g}</text>",
                 f"<text x='{left - 4}' y='{height - bottom}' font-size='9' text-anchor='end'>0</text>",
                 f"<text x='10' y='{(height - bottom + top) / 2}' font-size='9' transform='rotate(-90 10 "
                 f"{(height - bottom + top) / 2})' text-anchor='middle'>mean peak</text>"]
        for i, (t, v, f) in enumerate(zip(ts, vals, freq)):
            hgt = (height - bottom - top) * v / vmax
            x = left + 4 + i * bw
            colour = "#d9534f" if t in own else "#4a78d0"
            parts.append(f"<rect x='{x:.1f}' y='{height - bottom - hgt:.1f}' width='{bw - 8:.1f}' height='{hgt:.1f}' "
                         f"fill='{colour}'><title>t={t}: mean peak {v:.4g}, fires on {f:.1%} of images</title></rect>")
            parts.append(f"<text x='{x + (bw - 8) / 2:.1f}' y='{height - bottom + 12}' font-size='10' "
                         f"text-anchor='middle'>t={t}</text>")
            parts.append(f"<text x='{x + (bw - 8) / 2:.1f}' y='{height - bottom + 24}' font-size='9' "
                         f"text-anchor='middle' fill='#555'>{f:.0%} img</text>")
        parts.append("</svg>")
        return "".join(parts)

    def top_label(self, latent: int) -> str | None:
        """The commonest label among the latent's top images (None without labels)."""
        counts = self.stats.label_counts(latent, self.top_k)
        return self._label(next(iter(counts))) if counts else None

    def description(self, latent: int) -> str:
        """One line on what the latent does, from its best concept (IoU vs masks / saliency) and its purity."""
        s = self.stats
        if s.image_frequency[latent] == 0:
            return "never fires on these images"
        bc = self.best_concepts(latent, top=1)
        ref = self._reference()
        parts = []
        if bc:
            parts.append(f"{bc[0][0]} detector (IoU {_fmt(bc[0][1], 2)} vs {ref})")
        if self.purity_kind == "mask" and self.purity_concept[latent]:
            n = len(self.top_maps(latent))
            parts.append(f"peaks on {self.purity_concept[latent]} in {round(self.purity[latent] * n)}/{n} top images")
        elif self.top_label(latent) is not None:
            parts.append(f"top images mostly {self.top_label(latent)} ({_fmt(self.label_purity[latent], 2)})")
        parts.append(f"fires on {s.image_frequency[latent]:.0%} of images")
        return "; ".join(parts)

    def _defs(self) -> str:
        """What the numbers mean (shown on every page)."""
        ref = self._reference()
        purity = ("share of the top images whose peak position lies inside a mask of the latent's commonest concept "
                  "there (per object mask, colour or shape word, or background)" if self.purity_kind == "mask" else
                  "share of the top images that carry their commonest label")
        iou = (f"mean IoU of the latent's map (thresholded at tau of its max) with the concept's "
               f"{'ground-truth mask' if ref == 'mask' else 'saliency map'}, over images holding the concept"
               if ref else "no alignment computed")
        return (f"<dl class='defs'><dt>frequency</dt><dd>share of positions where the latent fires</dd>"
                f"<dt>images</dt><dd>share of images where it fires anywhere</dd><dt>purity</dt><dd>{purity}</dd>"
                f"<dt>entropy</dt><dd>label entropy (bits) of the top {self.top_k} images</dd>"
                f"<dt>IoU</dt><dd>{iou}</dd></dl>")

    def _cards(self, items: list[tuple[int, np.ndarray, float]], vmax: float) -> str:
        from ..viz import overlay

        cards = []
        for row, heat, peak in items:
            smp = self.samples([row])[0]
            cards.append(
                f"<div class='card'><div class='pair'><img src='{png_data_uri(smp.image)}' alt='image'>"
                f"<img src='{png_data_uri(overlay(smp.image, heat, vmin=0.0, vmax=vmax))}' alt='heat map'></div>"
                f"<div>peak {peak:.3f} &middot; {html.escape(self._label(int(smp.label)))}</div>"
                f"<div class='meta'>{html.escape(smp.caption)}</div></div>")
        return "".join(cards)

    def latent_html(self, latent: int, prev: int | None = None, next: int | None = None) -> str:
        """The latent's panel: description, top images and activation-interval examples (image + heat map on one
        colour scale), histogram, label distribution, best concepts; ``prev``/``next`` add navigation links."""
        s = self.stats
        top = self.top_maps(latent)
        vmax = max([p for *_, p in top], default=0.0) or 1.0
        cbar = colourbar_html(vmax, "latent activation; every map of this latent on this one scale, 0 to its top peak")
        intervals = "".join(
            f"<h3>Interval ({lo:.3g}, {hi:.3g}]: {len(items)} example(s)</h3>"
            f"<div class='grid'>{self._cards(items, vmax) or '<i>no other image peaks in this interval</i>'}</div>"
            for lo, hi, items in self.interval_maps(latent))
        counts = s.label_counts(latent, self.top_k)
        total = sum(counts.values()) or 1
        bars = "".join(f"<tr><td>{html.escape(self._label(y))}</td><td class='num'>{c}</td><td><span class='bar' "
                       f"style='width:{120 * c / total:.0f}px'></span></td></tr>" for y, c in counts.items())
        concepts = "".join(f"<tr><td>{html.escape(c)}</td><td class='num'>{_fmt(v)}</td></tr>"
                           for c, v in self.best_concepts(latent))
        ref = self._reference()
        nav = ("<div class='nav'><a href='index.html'>&larr; all latents</a>"
               + (f"<a id='prev' href='latent_{prev:05d}.html'>&lsaquo; previous (latent {prev})</a>" if prev is not None else "")
               + (f"<a id='next' href='latent_{next:05d}.html'>next (latent {next}) &rsaquo;</a>" if next is not None else "")
               + "</div>") if prev is not None or next is not None else ""
        pc = f" ({html.escape(self.purity_concept[latent])})" if self.purity_concept[latent] else ""
        return (
            f"{nav}<h2>Latent {latent}</h2><div class='desc'>{html.escape(self.description(latent))}</div>"
            f"<div class='meta'>frequency {_fmt(s.frequency[latent], 4)} of positions &middot; fires "
            f"on {s.image_frequency[latent]:.1%} of images &middot; purity {_fmt(self.purity[latent])}{pc} &middot; "
            f"label purity {_fmt(self.label_purity[latent])} &middot; label entropy {_fmt(self.entropy[latent])} bits</div>"
            f"{self._defs()}"
            f"<h2>Top-activating images</h2><div>{cbar}</div><div class='grid'>{self._cards(top, vmax) or '<i>never fires</i>'}</div>"
            f"<h2>Activation intervals</h2><div class='meta'>other images where the latent fires, by peak activation "
            f"(highest interval first), as in sae_vis</div>{intervals or '<i>-</i>'}"
            f"<div class='panel'><div><h2>Activation histogram</h2>{self._histogram_svg(latent)}</div>"
            f"<div><h2>Across timesteps</h2><div class='meta'>mean per-image peak; red: the SAE's timestep"
            f"</div>{self._timestep_svg(latent)}</div>"
            f"<div><h2>Labels of the top {self.top_k}</h2><table>{bars or '<tr><td>no labels</td></tr>'}</table></div>"
            f"<div><h2>Best-matching concepts</h2><div class='meta'>{'mean IoU vs ' + ref if ref else 'no alignment'}"
            f"</div><table>{concepts or '<tr><td>-</td></tr>'}</table></div></div>")

    def summary_rows(self, by: str = "frequency", limit: int | None = None, include_dead: bool = False) -> list[dict[str, Any]]:
        """One dict per listed latent: id, frequency, image frequency, purity (+ its concept), entropy, best
        concept and its IoU, top label, description."""
        rows = []
        for j in self.order(by, include_dead=include_dead)[:limit]:
            bc = self.best_concepts(j, top=1)
            rows.append({"latent": j, "frequency": float(self.stats.frequency[j]),
                         "image_frequency": float(self.stats.image_frequency[j]), "purity": float(self.purity[j]),
                         "purity_concept": self.purity_concept[j], "label_purity": float(self.label_purity[j]),
                         "entropy": float(self.entropy[j]), "best_concept": bc[0][0] if bc else None,
                         "alignment": bc[0][1] if bc else float("nan"), "label": self.top_label(j),
                         "description": self.description(j)})
        return rows

    def index_html(self, by: str = "frequency", limit: int | None = None, link: bool = True,
                   pages: set[int] | None = None) -> str:
        """The list of every latent (dead ones too), PAGE_SIZE per page, with a search box (latent id, concept,
        label, description) and sortable columns; ``pages``: latents that have a page (default: all that fire)."""
        from ..viz import overlay

        s = self.stats
        data = []
        for r in self.summary_rows(by, limit, include_dead=True):
            j = r["latent"]
            alive = s.image_frequency[j] > 0
            thumb = None
            top = self.top_maps(j)[:1] if alive else []
            if top:
                row, heat, peak = top[0]
                thumb = png_data_uri(overlay(self.samples([row])[0].image, heat, vmin=0.0, vmax=peak or 1.0))
            data.append({"id": j, "freq": _num(r["frequency"]), "imgfreq": _num(r["image_frequency"]),
                         "purity": _num(r["purity"]), "entropy": _num(r["entropy"]), "concept": r["best_concept"],
                         "iou": _num(r["alignment"]), "label": r["label"], "desc": html.escape(r["description"]),
                         "thumb": thumb, "page": bool(link and alive and (pages is None or j in pages))})
        cfg = getattr(self.model, "cfg", {}) or {}
        dead = int((s.image_frequency == 0).sum())
        head = (f"<h1>Revelio feature browser</h1><div class='meta'>store {html.escape(str(self.store.path))} &middot; "
                f"hook <b>{html.escape(self.hook)}</b> at t={self.t} &middot; d_sae {s.d_sae}, k {cfg.get('k', '?')} "
                f"&middot; {len(s.rows)} images &middot; <b>{len(data)} latents listed</b> ({dead} never fire here) "
                f"&middot; sorted by <b id='sorted'>{html.escape(by)}</b>; click a header to re-sort &middot; thumbnails: "
                f"the top image's heat map, 0 to its peak (jet)</div>{self._defs()}")
        tools = ("<div class='tools'><input id='search' type='search' placeholder='search: latent id, or a concept / label word'>"
                 "<button id='prev'>&lsaquo; prev</button><button id='next'>next &rsaquo;</button>"
                 "<span id='count' class='meta'></span></div>")
        cols = [("latent", "id", 1), ("top image", None, 0), ("frequency", "freq", 0), ("images", "imgfreq", 0),
                ("purity", "purity", 0), ("entropy", "entropy", 1), ("best concept", "concept", 1), ("IoU", "iou", 0),
                ("description", "desc", 1)]
        ths = "".join(f"<th data-key='{k}' data-asc='{a}'>{c}</th>" if k else f"<th>{c}</th>" for c, k, a in cols)
        payload = json.dumps(data).replace("</", "<\\/")
        return (f"{head}{tools}<table><thead><tr>{ths}</tr></thead><tbody id='body'></tbody></table>"
                f"<script type='application/json' id='latents'>{payload}</script>")

    def table_html(self, by: str = "frequency", limit: int | None = 20) -> str:
        """A static table (no script: notebooks) of the first ``limit`` latents in ``by`` order."""
        cols = ["latent", "frequency", "images", "purity", "entropy", "best concept", "IoU", "description"]
        body = "".join(
            f"<tr><td>{r['latent']}</td><td class='num'>{_fmt(r['frequency'], 4)}</td>"
            f"<td class='num'>{r['image_frequency']:.1%}</td><td class='num'>{_fmt(r['purity'])}</td>"
            f"<td class='num'>{_fmt(r['entropy'])}</td><td>{html.escape(r['best_concept'] or '-')}</td>"
            f"<td class='num'>{_fmt(r['alignment'])}</td><td>{html.escape(r['description'])}</td></tr>"
            for r in self.summary_rows(by, limit))
        n = len(self.order(by))
        return (f"<div class='meta'>the first {min(n, limit or n)} of {n} firing latents (of {self.stats.d_sae}), "
                f"sorted by {html.escape(by)}</div>{self._defs()}<table><thead><tr>"
                + "".join(f"<th>{c}</th>" for c in cols) + f"</tr></thead><tbody>{body}</tbody></table>")

    # ---- outputs ------------------------------------------------------------------------
    def export(self, out_dir: str | Path, by: str = "frequency", limit: int | None = None) -> Path:
        """Write the static dashboard: index.html listing every latent, and one page per firing latent (the first
        ``limit`` in ``by`` order when given) with previous/next links in that order; returns index.html's path.

        Pages are written atomically and the index last, so an interrupted export has no index.
        """
        from tqdm.auto import tqdm

        out = Path(out_dir)
        ids = self.order(by)[:limit]
        self.prefetch(ids)
        for n, j in enumerate(tqdm(ids, desc="dashboard", unit="latent", disable=not self.progress, dynamic_ncols=True)):
            prev = ids[n - 1] if n > 0 else None
            nxt = ids[n + 1] if n + 1 < len(ids) else None
            write_text_atomic(out / f"latent_{j:05d}.html", _page(f"latent {j}", self.latent_html(j, prev, nxt)))
        return write_text_atomic(out / "index.html", _page(
            "Revelio feature browser", self.index_html(by, None, pages=set(ids)),
            f"const PAGE={PAGE_SIZE};" + INDEX_JS,
            f" data-sort='{SORT_FIELD[by]}'"))

    def show(self, latent: int) -> None:
        """Display one latent's panel in a notebook."""
        from IPython.display import HTML, display

        display(HTML(f"<style>{CSS}</style>" + self.latent_html(latent)))

    def widget(self, by: str = "frequency", limit: int | None = 64) -> Any:
        """An ipywidgets UI: pick the sort key and a latent, see its panel."""
        import ipywidgets as W
        from IPython.display import HTML, display

        sort = W.Dropdown(options=list(SORT_KEYS), value=by, description="sort by")
        pick = W.Dropdown(description="latent")
        out = W.Output()

        def relist(_=None):
            rows = self.summary_rows(sort.value, limit)
            pick.options = [(f"{r['latent']}  freq {r['frequency']:.3f}  purity {_fmt(r['purity'], 2)}  "
                             f"{r['best_concept'] or ''}", r["latent"]) for r in rows]

        def render(_=None):
            out.clear_output()
            if pick.value is not None:
                with out:
                    display(HTML(f"<style>{CSS}</style>" + self.latent_html(pick.value)))

        sort.observe(relist, names="value")
        pick.observe(render, names="value")
        relist()
        render()
        return W.VBox([W.HBox([sort, pick]), out])


