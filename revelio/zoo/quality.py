"""Does a zoo model draw what its prompt says? An independent check of generated shapes images.

The check never looks at the model: it finds the largest saturated blob of an image (shapes
backgrounds are desaturated, objects are vivid), names its colour by the nearest palette
colour and its shape with a small classifier of rotation-invariant mask features, trained on
real ``shapes`` images through the very same blob extraction. Its accuracy on real test images
is reported beside the model's, as the ceiling of what the check can see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from sklearn.ensemble import RandomForestClassifier
from tqdm.auto import tqdm

from ..datasets.shapes import COLORS, SHAPES, Shapes, phrase

CHROMA_MIN = 80.0  # backgrounds stay below ~50 (max - min channel), palette colours are above 140
PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
N_FEATURES = 12


def largest_blobs(image: np.ndarray, k: int, by_colour: bool = False) -> list[np.ndarray]:
    """Boolean masks of the ``k`` largest connected regions of vivid pixels (at least 12 pixels each), largest first.

    ``by_colour``: vivid pixels are first split by their nearest palette colour, so two touching objects of
    different colours are two regions (a plain vivid mask merges them into one)."""
    img = image.astype(np.float32)
    vivid = (img.max(axis=2) - img.min(axis=2)) > CHROMA_MIN
    if by_colour:
        nearest = ((img[..., None, :] - PALETTE) ** 2).sum(-1).argmin(-1)
        masks = [ndimage.binary_opening(vivid & (nearest == c)) for c in range(len(PALETTE))]
    else:
        masks = [ndimage.binary_opening(vivid)]
    blobs: list[tuple[float, np.ndarray]] = []
    for mask in masks:
        labels, n = ndimage.label(mask)
        if n:
            sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
            blobs += [(float(sizes[i]), labels == i + 1) for i in range(n) if sizes[i] >= 12]
    order = sorted(range(len(blobs)), key=lambda i: -blobs[i][0])[:k]  # stable: ties keep palette order
    return [blobs[i][1] for i in order]


def largest_blob(image: np.ndarray) -> np.ndarray | None:
    """Boolean mask of the largest connected region of vivid pixels of an RGB uint8 image, or None."""
    blobs = largest_blobs(image, 1)
    return blobs[0] if blobs else None


def blob_colour(image: np.ndarray, blob: np.ndarray) -> str:
    """The palette colour nearest to the blob's median RGB."""
    rgb = np.median(image[blob].astype(np.float32), axis=0)
    return list(COLORS)[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def shape_features(blob: np.ndarray) -> np.ndarray:
    """Rotation- and scale-invariant descriptors of a mask: solidity, compactness, elongation, radial profile, Hu."""
    ys, xs = np.nonzero(blob)
    area = float(len(xs))
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    corners = np.concatenate([pts + d for d in ([0, 0], [1, 0], [0, 1], [1, 1])])
    try:
        hull_area = ConvexHull(corners).volume
    except QhullError:
        hull_area = area
    boundary = blob & ~ndimage.binary_erosion(blob)
    perimeter = float(boundary.sum())
    c = pts.mean(axis=0)
    cov = np.cov((pts - c).T) + 1e-6 * np.eye(2)
    ev = np.sort(np.linalg.eigvalsh(cov))
    by, bx = np.nonzero(boundary)
    r = np.hypot(bx - c[0], by - c[1])
    rn = r / (r.mean() + 1e-6)
    mu = {(p, q): (((pts[:, 0] - c[0]) ** p) * ((pts[:, 1] - c[1]) ** q)).sum() for p in range(4) for q in range(4)
          if 2 <= p + q <= 3}
    eta = {k: v / area ** (1 + sum(k) / 2) for k, v in mu.items()}
    hu1 = eta[2, 0] + eta[0, 2]
    hu2 = (eta[2, 0] - eta[0, 2]) ** 2 + 4 * eta[1, 1] ** 2
    hu3 = (eta[3, 0] - 3 * eta[1, 2]) ** 2 + (3 * eta[2, 1] - eta[0, 3]) ** 2
    hu4 = (eta[3, 0] + eta[1, 2]) ** 2 + (eta[2, 1] + eta[0, 3]) ** 2
    return np.array([area / hull_area, perimeter ** 2 / (4 * np.pi * area), ev[0] / ev[1], rn.std(), rn.max(),
                     rn.min(), np.percentile(rn, 90) - np.percentile(rn, 10), hu1,
                     np.log(hu2 + 1e-9), np.log(hu3 + 1e-9), np.log(hu4 + 1e-9), area / (4 * r.mean() ** 2 + 1e-6)])


@dataclass
class ShapesJudge:
    """Names the colour and shape of the largest object of an image (see module docstring)."""

    classifier: RandomForestClassifier
    real_shape_accuracy: float
    real_colour_accuracy: float

    @classmethod
    def fit(cls, n_train: int = 600, n_val: int = 300, seed: int = 0) -> "ShapesJudge":
        """Train the shape classifier on real single-object shapes images (a seed stream of their own)."""
        images, colours, shapes = real_images(n_train + n_val, seed)
        blobs = [largest_blob(im) for im in images[:n_train]]
        feats = [shape_features(b) if b is not None else np.zeros(N_FEATURES) for b in blobs]
        clf = RandomForestClassifier(n_estimators=200, random_state=seed).fit(feats, shapes[:n_train])
        judge = cls(clf, 0.0, 0.0)
        acc = judge.accuracy(images[n_train:], [f"{c} {s}" for c, s in zip(colours[n_train:], shapes[n_train:])])
        judge.real_colour_accuracy, judge.real_shape_accuracy = acc["colour"], acc["shape"]
        return judge

    def accuracy(self, images: list[np.ndarray], pairs: list[str]) -> dict:
        """Colour, shape and joint accuracy of images meant to show ``pairs`` ("colour shape").

        Also ``shape_recall`` (per asked shape: the share judged that shape) and ``confusion``
        (``confusion[asked][judged]`` counts; ``"none"`` where no vivid object was found).
        """
        got = [self.judge(im) for im in images]
        want = [tuple(p.split(" ")) for p in pairs]
        conf = confusion([w[1] for w in want], [g[1] for g in got])
        return {"colour": float(np.mean([g[0] == w[0] for g, w in zip(got, want)])),
                "shape": float(np.mean([g[1] == w[1] for g, w in zip(got, want)])),
                "both": float(np.mean([g == w for g, w in zip(got, want)])), "n": len(images),
                "shape_recall": shape_recall(conf), "confusion": conf}

    def agreement(self, other: "ShapesJudge", images: list[np.ndarray]) -> float:
        """Share of ``images`` whose largest object both judges name the same shape (no object: agreed). Two judges
        fitted on different real images agree on real shapes; on outlines that are no clear shape (a ragged blob)
        their calls are arbitrary and part of them differ, so a low agreement says the shape score is partly luck."""
        if not images:
            raise ValueError("agreement: no images")
        return float(np.mean([self.judge(im)[1] == other.judge(im)[1] for im in images]))

    def judge(self, image: np.ndarray) -> tuple[str | None, str | None]:
        """(colour, shape) of the largest vivid object of an RGB uint8 image; (None, None) when there is none."""
        blob = largest_blob(image)
        if blob is None:
            return None, None
        return blob_colour(image, blob), str(self.classifier.predict(shape_features(blob)[None])[0])


def confusion(asked: list[str], judged: list[str | None]) -> dict[str, dict[str, int]]:
    """``{asked shape: {judged shape or "none": count}}`` over the shapes that were asked for."""
    cols = SHAPES + ["none"]
    out = {a: dict.fromkeys(cols, 0) for a in SHAPES if a in asked}
    for a, j in zip(asked, judged):
        out[a][j if j in SHAPES else "none"] += 1
    return out


def shape_recall(conf: dict[str, dict[str, int]]) -> dict[str, float]:
    """Per asked shape, the share of its images judged that shape."""
    return {a: row[a] / max(1, sum(row.values())) for a, row in conf.items()}


def format_confusion(conf: dict[str, dict[str, int]]) -> str:
    """The confusion matrix as text: one row per asked shape, one column per judged shape, then its recall."""
    cols = SHAPES + ["none"]
    lines = [f"{'asked/judged':<15}" + "".join(f"{c:>9}" for c in cols) + f"{'recall':>9}"]
    for a, row in conf.items():
        rec = row[a] / max(1, sum(row.values()))
        lines.append(f"{a:<15}" + "".join(f"{row[c]:>9d}" for c in cols) + f"{rec:>9.0%}")
    return "\n".join(lines)


def judge_objects(judge: "ShapesJudge", image: np.ndarray, k: int = 2) -> list[tuple[str, str]]:
    """(colour, shape) of each of the ``k`` largest vivid objects of an image (fewer when fewer are found); for
    ``k`` > 1 the objects are single-colour regions, so objects that touch are still told apart by colour."""
    return [(blob_colour(image, b), str(judge.classifier.predict(shape_features(b)[None])[0]))
            for b in largest_blobs(image, k, by_colour=k > 1)]


def two_object_accuracy(judge: "ShapesJudge", images: list[np.ndarray],
                        wanted: list[tuple[tuple[str, str], tuple[str, str]]]) -> dict:
    """Scores of images meant to show two objects ((colour, shape), (colour, shape)), judged on the 2 largest blobs.

    ``colours``: both asked colours are the blobs' colours; ``shapes``: the blobs' shapes are the asked
    two (as a multiset); ``bound``: each blob has its asked colour *and* shape; ``two_blobs``: two were found.
    """
    got = [judge_objects(judge, im, 2) for im in images]
    colours = [sorted(g[0] for g in o) == sorted(w[0] for w in ws) for o, ws in zip(got, wanted)]
    shapes = [sorted(g[1] for g in o) == sorted(w[1] for w in ws) for o, ws in zip(got, wanted)]
    bound = [sorted(o) == sorted(ws) for o, ws in zip(got, wanted)]
    return {"colours": float(np.mean(colours)), "shapes": float(np.mean(shapes)), "bound": float(np.mean(bound)),
            "two_blobs": float(np.mean([len(o) == 2 for o in got])), "n": len(images)}


def two_object_prompts(n: int, seed: int = 0) -> tuple[list[str], list[tuple[tuple[str, str], tuple[str, str]]]]:
    """``n`` random prompts "a red circle and a blue square": two different colours and two different shapes."""
    rng = np.random.default_rng(seed)
    prompts, wanted = [], []
    for _ in range(n):
        c = rng.choice(list(COLORS), 2, replace=False)
        k = rng.choice(SHAPES, 2, replace=False)
        objs = ((str(c[0]), str(k[0])), (str(c[1]), str(k[1])))
        prompts.append(f"{phrase(*objs[0])} and {phrase(*objs[1])}")
        wanted.append(objs)
    return prompts, wanted


def real_images(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[str], list[str]]:
    """``n`` real single-object shapes images (uint8 RGB) with the colour and shape of their object."""
    ds = Shapes(64, count=n, seed=10_000 + seed, max_objects=1, split="test")
    images, colours, shapes = [], [], []
    for i in tqdm(range(n), desc="real shapes", leave=False):
        images.append(np.array(ds[i].image))
        obj = ds.layout(i)[0]
        colours.append(obj["color"])
        shapes.append(obj["shape"])
    return images, colours, shapes


def real_two_object_images(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[tuple[tuple[str, str], ...]]]:
    """``n`` real shapes images with exactly two objects of different colours and shapes (as the prompts of
    ``two_object_prompts`` ask), with their ((colour, shape), (colour, shape))."""
    ds = Shapes(64, count=20 * n, seed=20_000 + seed, max_objects=3, split="test")
    images, wanted = [], []
    for i in range(len(ds)):
        objs = ds.layout(i)
        if len(objs) == 2 and objs[0]["color"] != objs[1]["color"] and objs[0]["shape"] != objs[1]["shape"]:
            images.append(np.array(ds[i].image))
            wanted.append(tuple((o["color"], o["shape"]) for o in objs))
            if len(images) == n:
                break
    return images, wanted


@torch.no_grad()
def reconstruct(vae, images: list[np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
    """Images passed through ``vae`` (posterior mode, then decode): what a perfect denoiser could at best show."""
    out: list[np.ndarray] = []
    p = next(vae.parameters())
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.stack(images[i:i + batch_size])).permute(0, 3, 1, 2).to(p) / 127.5 - 1
        r = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        out += list(((r.permute(0, 2, 3, 1).float().cpu().numpy() + 1) * 127.5).round().astype(np.uint8))
    return out


caption = phrase  # the training-caption wording of a single object ("an orange star")


def all_pairs() -> list[str]:
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch_size: int = 16) -> list[np.ndarray]:
    """Generate one 64x64 image per (prompt, seed) with classifier-free guidance; uint8 RGB arrays.

    ``tiny-sd`` (StableDiffusionPipeline) uses ``guidance_scale``; ``tiny-flux`` (FluxPipeline, no guidance
    embedding) uses true CFG against the empty prompt and the 32-token text length it was trained with.
    """
    from extraction.adapters import get_adapter

    ad = get_adapter(pipe)
    out: list[np.ndarray] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False):
        p, sd = prompts[i:i + batch_size], seeds[i:i + batch_size]
        gens = [torch.Generator().manual_seed(s) for s in sd]
        kw = dict(height=64, width=64, num_inference_steps=steps, generator=gens, output_type="np")
        kw.update(ad.generation_kwargs(guidance, batch=len(p), negative=""))  # CFG against the empty prompt
        imgs = pipe(prompt=p, **kw).images
        out += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in imgs]
    return out


def noise_level(ad, snr: float) -> tuple[float, torch.Tensor | None]:
    """The model's time at signal-to-noise ratio ``snr`` (signal variance / noise variance of x_t).

    Rectified flow: s with ((1 - s) / s)^2 = snr. DDPM: the integer timestep whose alpha-bar / (1 - alpha-bar)
    is nearest, and that alpha-bar. Returns (time, alpha-bar or None)."""
    if ad.flow:
        return 1.0 / (1.0 + snr ** 0.5), None
    abar = ad._ddpm.alphas_cumprod.float()
    t = int(torch.argmin((abar / (1 - abar) - snr).abs()))
    return float(t), abar[t]


def _latents_and_noise(ad, images: list[np.ndarray], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's latents of uint8 RGB ``images`` (float32) and one seeded noise draw of their shape."""
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = ad.encode_images(pixels).float()
    return z, torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)


def noised(ad, z: torch.Tensor, noise: torch.Tensor, snr: float) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """Latents ``z`` noised to signal-to-noise ratio ``snr`` the model's way (rectified flow: (1 - s) z + s eps;
    DDPM: sqrt(abar) z + sqrt(1 - abar) eps), in the model's dtype: (x_t, time, alpha-bar or None)."""
    time, abar = noise_level(ad, snr)
    xt = (1 - time) * z + time * noise if ad.flow else abar.sqrt() * z + (1 - abar).sqrt() * noise
    return xt.to(ad.dtype), time, abar


@torch.no_grad()
def predicted_clean(ad, xt: torch.Tensor, time: float, abar: torch.Tensor | None, prompts: list[str]) -> torch.Tensor:
    """The denoiser's estimate of the clean latents from x_t under ``prompts`` (one per row of ``xt``)."""
    cond = ad.encode_prompts(prompts)
    if ad.flow:  # x_s = (1 - s) x0 + s eps, v = eps - x0  ->  x0 = x_s - s v
        v = ad.denoise(xt, torch.full((len(xt),), time, dtype=ad.dtype, device=ad.device), cond)
        return xt - time * v
    out = ad.denoise(xt, torch.full((len(xt),), int(time), dtype=torch.long, device=ad.device), cond)
    kind = ad._ddpm.config.prediction_type
    if kind == "epsilon":
        return (xt - (1 - abar).sqrt() * out) / abar.sqrt()
    if kind == "v_prediction":
        return abar.sqrt() * xt - (1 - abar).sqrt() * out
    raise ValueError(f"prediction type {kind!r}: no clean-latent estimate (epsilon, v_prediction)")


@torch.no_grad()
def text_sensitivity(pipe, images: list[np.ndarray], colours: list[str], shapes: list[str],
                     snrs: tuple[float, ...] = (0.02, 0.2, 1.0, 5.0), seed: int = 0) -> list[dict]:
    """How much the model's clean-image estimate depends on each word of "a <colour> <shape>".

    Real single-object images are noised to each signal-to-noise ratio (the same noise for every prompt), the
    denoiser estimates the clean latents under the true caption, under each caption with the shape word
    swapped for another shape, with the colour word swapped, and under the empty prompt, and the estimates
    are decoded. Returned per level: the RMS pixel difference (in [0, 1] units) from the true caption's
    estimate, averaged over swaps and images. A model that draws what it is told changes its picture when
    the shape word changes, most where outlines form (mid noise); one that has not learned to use a word
    returns nearly the same picture.
    """
    from extraction.adapters import get_adapter

    ad = get_adapter(pipe)
    vae = pipe.vae
    z, noise = _latents_and_noise(ad, images, seed)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        x = vae.decode((latents / vae.config.scaling_factor + shift).to(next(vae.parameters()).dtype)).sample
        return (x.float().clamp(-1, 1) + 1) / 2

    def rms(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).pow(2).mean(dim=(1, 2, 3)).sqrt().mean())

    true = [phrase(c, s) for c, s in zip(colours, shapes)]
    rows = []
    for snr in tqdm(snrs, desc="text sensitivity", leave=False):
        xt, time, abar = noised(ad, z, noise, snr)
        base = decode(predicted_clean(ad, xt, time, abar, true))
        row = {"snr": snr, "time": time}
        for word, swaps in (("shape", [[phrase(c, k) for c in colours] for k in SHAPES]),
                            ("colour", [[phrase(k, s) for s in shapes] for k in COLORS])):
            diffs = []
            for prompts in swaps:
                keep = [p != t for p, t in zip(prompts, true)]  # the swapped word differs from the true one
                if not any(keep):
                    continue
                idx = [i for i, k in enumerate(keep) if k]
                est = decode(predicted_clean(ad, xt[idx], time, abar, [prompts[i] for i in idx]))
                diffs.append(rms(est, base[idx]) * len(idx))
            row[word] = sum(diffs) / ((len(SHAPES if word == "shape" else COLORS) - 1) * len(true))
        row["empty"] = rms(decode(predicted_clean(ad, xt, time, abar, [""] * len(true))), base)
        rows.append(row)
    return rows


@torch.no_grad()
def word_separation(pipe) -> dict[str, dict[str, float]]:
    """How far apart the text encoders put captions that differ in one word, in what the denoiser reads.

    Every "a <colour> <shape>" caption is encoded as the denoiser receives it (``Adapter.encode_prompts``: for
    Flux the T5 sequence and the pooled CLIP vector, for SD the CLIP sequence); returned per conditioning tensor:
    the mean Euclidean distance between the encodings of two captions that differ in the shape word only
    (``shape``), in the colour word only (``colour``), and their ratio (``ratio``, shape / colour). Random
    encoders give a ratio near 1 for the T5 sequence; a text encoder trained with a denoiser that did not use
    the shape word can leave the shape words where they were while it spreads the colours apart (the v2
    tiny-flux's T5: ratio 0.89 at init, 0.21 trained; tiny-sd's CLIP went from 0.49 to 0.86; docs/zoo.md,
    fifteenth session).
    """
    from extraction.adapters import get_adapter

    ad = get_adapter(pipe)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    cond = ad.encode_prompts([phrase(c, s) for c, s in pairs])
    out: dict[str, dict[str, float]] = {}
    for key, value in cond.items():
        if key.endswith("_ids") or not torch.is_tensor(value) or not value.is_floating_point() \
                or value.shape[0] != len(pairs):  # token positions (Flux's txt_ids) are no encoding
            continue
        flat = value.float().flatten(1)
        dist = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")  # exact: 0 for equal rows
        same_colour = torch.tensor([[a[0] == b[0] and a[1] != b[1] for b in pairs] for a in pairs])
        same_shape = torch.tensor([[a[1] == b[1] and a[0] != b[0] for b in pairs] for a in pairs])
        shape, colour = float(dist[same_colour].mean()), float(dist[same_shape].mean())
        out[key] = {"shape": shape, "colour": colour, "ratio": shape / colour if colour else float("nan")}
    return out


@torch.no_grad()
def attention_reach(pipe, images: list[np.ndarray], captions: list[str], snr: float = 0.2, seed: int = 0
                    ) -> list[dict]:
    """Where a Flux transformer's image tokens look: per block, the attention mass of an image token's query on
    image tokens at each Chebyshev offset (0 = itself, 1 = its 8 neighbours, ...) and on the text tokens, and the
    mean of each query's largest weight over image tokens (1: it picks one token; 1 / tokens: uniform), and the
    mass on each text position (``text_tokens``: which words the image reads; T5 pads included).

    Real images are noised to ``snr`` (``noise_level``) and denoised once under their captions; queries and keys
    are recomputed from each attention's own projections, norms and rotary embedding (as diffusers' Flux
    processor computes them), averaged over heads, queries and images. A convolution-like layer puts most mass
    on offsets 0-1; an attention too flat to pick neighbours spreads it as the number of tokens at each offset.
    """
    from extraction.adapters import get_adapter
    from extraction.hooks import Hooks

    ad = get_adapter(pipe)
    t = ad.denoiser
    if ad.kind != "flux":
        raise ValueError(f"attention_reach reads Flux attention; got a {ad.kind} model ({type(t).__name__})")
    z, noise = _latents_and_noise(ad, images, seed)
    xt, time, _ = noised(ad, z, noise, snr)
    h, w = z.shape[-2] // 2, z.shape[-1] // 2
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1)
    cheb = (pos[:, None] - pos[None]).abs().max(-1).values  # (N, N) offsets between image tokens
    rows: list[dict] = []

    def hook(name: str):
        def pre(attn, args, kwargs):
            probs = flux_attention_probs(attn, kwargs)
            n_txt = probs.shape[-1] - h * w
            img = probs[:, :, n_txt:]  # image-token queries
            by_offset = [float((img[..., n_txt:] * (cheb == d)).sum(-1).mean()) for d in range(int(cheb.max()) + 1)]
            rows.append({"block": name, "offsets": by_offset, "text": float(img[..., :n_txt].sum(-1).mean()),
                         "text_tokens": img[..., :n_txt].mean((0, 1, 2)).tolist(),
                         "top1": float(img[..., n_txt:].max(-1).values.mean())})
        return pre

    with Hooks(t) as hooks:
        for n, m in t.named_modules():
            if n.endswith(".attn"):
                hooks.pre(m, hook(n.rsplit(".attn", 1)[0]), with_kwargs=True)
        ad.denoise(xt, torch.full((len(xt),), time, dtype=ad.dtype, device=ad.device), ad.encode_prompts(captions))
    return rows


def flux_attention_probs(attn, kwargs: dict) -> torch.Tensor:
    """The attention probabilities (B, heads, queries, keys) of one diffusers Flux attention call, from the keyword
    arguments it was called with: queries and keys from its projections, per-head RMSNorms and rotary embedding,
    text tokens first when the call has ``encoder_hidden_states`` (a double-stream block), as Flux's processor
    orders them."""
    from diffusers.models.embeddings import apply_rotary_emb

    x, enc, rope = kwargs["hidden_states"], kwargs.get("encoder_hidden_states"), kwargs["image_rotary_emb"]

    def heads(v: torch.Tensor) -> torch.Tensor:
        return v.unflatten(-1, (attn.heads, -1))

    q, k = attn.norm_q(heads(attn.to_q(x))), attn.norm_k(heads(attn.to_k(x)))
    if enc is not None:
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(enc))), q], 1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(enc))), k], 1)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    return torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()).div(q.shape[-1] ** 0.5).softmax(-1)
