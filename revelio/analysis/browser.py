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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..files import write_text_atomic
from .alignment import AlignmentTable
from .stats import LatentStats, latent_stats

SORT_KEYS = ("frequency", "purity", "alignment", "index")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:22px 0 8px} .meta{color:#5b6475;font-size:13px}
table{border-collapse:collapse;font-size:13px;background:#fff} th,td{border-bottom:1px solid #e3e6ec;padding:5px 9px;text-align:left}
th{background:#eef1f6;cursor:pointer;user-select:none;position:sticky;top:0} tr:hover td{background:#f4f7ff}
td.num{text-align:right;font-variant-numeric:tabular-nums} img.thumb{width:44px;height:44px;image-rendering:pixelated;border-radius:3px}
.grid{display:flex;flex-wrap:wrap;gap:10px} .card{background:#fff;border:1px solid #e3e6ec;border-radius:6px;padding:6px;width:150px;font-size:11px}
.card img{width:150px;height:150px;image-rendering:pixelated;border-radius:4px} .pair{display:flex;gap:4px}
.pair img{width:73px;height:73px} .bar{background:#4c78d8;height:12px;border-radius:2px;display:inline-block}
.panel{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start} a{color:#2456c5;text-decoration:none}
"""

SORT_JS = """
document.querySelectorAll('th[data-col]').forEach(th=>th.addEventListener('click',()=>{
 const t=th.closest('table'),b=t.tBodies[0],c=+th.dataset.col,asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
 const key=r=>{const v=r.cells[c].dataset.v;return v===undefined?r.cells[c].textContent:+v};
 [...b.rows].sort((x,y)=>{const a=key(x),z=key(y);return (a>z?1:a<z?-1:0)*(asc?1:-1)}).forEach(r=>b.appendChild(r));}));
"""


def png_data_uri(image: Image.Image | np.ndarray) -> str:
    """An image as a ``data:image/png;base64,...`` URI (embeds it in HTML)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}<script>{SORT_JS}</script></body></html>")


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
        self.class_names = list(getattr(self.dataset, "class_names", []) or [])
        self._samples: dict[int, Any] = {}
        self._top: dict[int, list[tuple[int, np.ndarray, float]]] = {}
        self._scores: dict[str, tuple[list[str], np.ndarray]] = {}
        self.alignment = alignment
        if alignment is None and align:
            self.alignment = self._mask_alignment(eval_size)
        self.purity, self.entropy = self.stats.purity_entropy(top_k)

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

    def top_maps(self, latent: int) -> list[tuple[int, np.ndarray, float]]:
        """(store row, (h, w) map, peak) of the latent's top images (cached)."""
        from .feature_maps import store_feature_maps

        if latent in self._top:
            return self._top[latent]
        idx = self.stats.top_images(latent, self.top_k)
        rows = self.stats.rows[idx]
        if not len(rows):
            return []
        order = np.argsort(rows)
        maps = store_feature_maps(self.store, self.model, rows[order], latents=[latent])[:, 0]
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        self._top[latent] = [(int(rows[i]), maps[back[i]], float(self.stats.peak[idx[i], latent]))
                             for i in range(len(rows))]
        return self._top[latent]

    # ---- HTML ---------------------------------------------------------------------------
    def _label(self, y: int) -> str:
        return self.class_names[y] if 0 <= y < len(self.class_names) else str(y)

    def _histogram_svg(self, latent: int, width: int = 300, height: int = 130) -> str:
        """The latent's peak-activation histogram as inline SVG (no image encoding, renders anywhere)."""
        counts, edges = self.stats.histogram(latent)
        top = max(int(counts.max()), 1)
        plot_h, bw = height - 30, width / len(counts)
        bars = "".join(f"<rect x='{i * bw:.1f}' y='{plot_h - plot_h * c / top:.1f}' width='{max(bw - 1, 1):.1f}' "
                       f"height='{plot_h * c / top:.1f}' fill='#4c78d8'><title>{edges[i]:.3g}-{edges[i + 1]:.3g}: "
                       f"{int(c)} images</title></rect>" for i, c in enumerate(counts))
        return (f"<svg width='{width}' height='{height}' font-size='10' font-family='sans-serif'>{bars}"
                f"<line x1='0' y1='{plot_h}' x2='{width}' y2='{plot_h}' stroke='#888'/>"
                f"<text x='0' y='{plot_h + 12}'>{edges[0]:.3g}</text>"
                f"<text x='{width}' y='{plot_h + 12}' text-anchor='end'>{edges[-1]:.3g}</text>"
                f"<text x='{width / 2}' y='{height - 2}' text-anchor='middle'>peak activation per image "
                f"(max bar {top} images)</text></svg>")

    def latent_html(self, latent: int) -> str:
        """The latent's panel: top images (image + heat-map overlay), histogram, label distribution, best concepts."""
        from ..viz import overlay

        s = self.stats
        cards = []
        for row, heat, peak in self.top_maps(latent):
            smp = self.samples([row])[0]
            cards.append(
                f"<div class='card'><div class='pair'><img src='{png_data_uri(smp.image)}' alt='image'>"
                f"<img src='{png_data_uri(overlay(smp.image, heat))}' alt='heat map'></div>"
                f"<div>peak {peak:.3f} &middot; {html.escape(self._label(int(smp.label)))}</div>"
                f"<div class='meta'>{html.escape(smp.caption)}</div></div>")
        counts = s.label_counts(latent, self.top_k)
        total = sum(counts.values()) or 1
        bars = "".join(f"<tr><td>{html.escape(self._label(y))}</td><td class='num'>{c}</td><td><span class='bar' "
                       f"style='width:{120 * c / total:.0f}px'></span></td></tr>" for y, c in counts.items())
        concepts = "".join(f"<tr><td>{html.escape(c)}</td><td class='num'>{v:.3f}</td></tr>"
                           for c, v in self.best_concepts(latent))
        ref = self._reference()
        return (
            f"<h2>Latent {latent}</h2><div class='meta'>frequency {s.frequency[latent]:.4f} of positions &middot; fires "
            f"on {s.image_frequency[latent]:.1%} of images &middot; purity {_fmt(self.purity[latent])} &middot; label "
            f"entropy {_fmt(self.entropy[latent])} bits</div>"
            f"<h2>Top-activating images</h2><div class='grid'>{''.join(cards) or '<i>never fires</i>'}</div>"
            f"<div class='panel'><div><h2>Activation histogram</h2>{self._histogram_svg(latent)}</div>"
            f"<div><h2>Labels of the top {self.top_k}</h2><table>{bars or '<tr><td>no labels</td></tr>'}</table></div>"
            f"<div><h2>Best-matching concepts</h2><div class='meta'>{'mean IoU vs ' + ref if ref else 'no alignment'}"
            f"</div><table>{concepts or '<tr><td>-</td></tr>'}</table></div></div>")

    def summary_rows(self, by: str = "frequency", limit: int | None = 64) -> list[dict[str, Any]]:
        """One dict per listed latent: id, frequency, image frequency, purity, entropy, best concept."""
        rows = []
        for j in self.order(by)[:limit]:
            bc = self.best_concepts(j, top=1)
            rows.append({"latent": j, "frequency": float(self.stats.frequency[j]),
                         "image_frequency": float(self.stats.image_frequency[j]), "purity": float(self.purity[j]),
                         "entropy": float(self.entropy[j]), "best_concept": bc[0][0] if bc else None,
                         "alignment": bc[0][1] if bc else float("nan")})
        return rows

    def index_html(self, by: str = "frequency", limit: int | None = 64, link: bool = True) -> str:
        """The latent list (sortable by clicking a column header)."""
        s = self.stats
        body = []
        for r in self.summary_rows(by, limit):
            j = r["latent"]
            top = self.top_maps(j)[:1]
            thumb = ""
            if top:
                from ..viz import overlay

                row, heat, _ = top[0]
                thumb = f"<img class='thumb' src='{png_data_uri(overlay(self.samples([row])[0].image, heat))}'>"
            name = f"<a href='latent_{j:05d}.html'>{j}</a>" if link else str(j)
            body.append(
                f"<tr><td data-v='{j}'>{name}</td><td>{thumb}</td>"
                f"<td class='num' data-v='{r['frequency']}'>{r['frequency']:.4f}</td>"
                f"<td class='num' data-v='{r['image_frequency']}'>{r['image_frequency']:.1%}</td>"
                f"<td class='num' data-v='{np.nan_to_num(r['purity'], nan=-1)}'>{_fmt(r['purity'])}</td>"
                f"<td class='num' data-v='{np.nan_to_num(r['entropy'], nan=99)}'>{_fmt(r['entropy'])}</td>"
                f"<td>{html.escape(r['best_concept'] or '-')}</td>"
                f"<td class='num' data-v='{np.nan_to_num(r['alignment'], nan=-1)}'>{_fmt(r['alignment'])}</td></tr>")
        cfg = getattr(self.model, "cfg", {}) or {}
        dead = int((s.image_frequency == 0).sum())
        head = (f"<h1>Revelio feature browser</h1><div class='meta'>store {html.escape(str(self.store.path))} &middot; "
                f"hook <b>{html.escape(self.hook)}</b> at t={self.t} &middot; d_sae {s.d_sae}, k {cfg.get('k', '?')} "
                f"&middot; {len(s.rows)} images &middot; {dead} latents never fire here &middot; sorted by {by}; "
                f"click a header to re-sort</div>")
        cols = ["latent", "top image", "frequency", "images", "purity", "entropy", "best concept", "alignment"]
        ths = "".join(f"<th data-col='{i}'>{c}</th>" for i, c in enumerate(cols))
        return f"{head}<table><thead><tr>{ths}</tr></thead><tbody>{''.join(body)}</tbody></table>"

    # ---- outputs ------------------------------------------------------------------------
    def export(self, out_dir: str | Path, by: str = "frequency", limit: int | None = 64) -> Path:
        """Write the static dashboard (index.html + one page per listed latent); returns index.html's path.

        Pages are written atomically and the index last, so an interrupted export has no index.
        """
        from tqdm.auto import tqdm

        out = Path(out_dir)
        ids = self.order(by)[:limit]
        for j in tqdm(ids, desc="dashboard", unit="latent", disable=not self.progress, dynamic_ncols=True):
            back = "<div class='meta'><a href='index.html'>&larr; all latents</a></div>"
            write_text_atomic(out / f"latent_{j:05d}.html", _page(f"latent {j}", back + self.latent_html(j)))
        return write_text_atomic(out / "index.html", _page("Revelio feature browser", self.index_html(by, limit)))

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


