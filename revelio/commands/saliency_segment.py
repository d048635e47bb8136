"""``revelio saliency`` (per-image saliency maps + overlays) and ``revelio segment`` (zero-shot segmentation table)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps

from ..cli import command
from ..config import ConfigError, field, to_dict
from ..datasets import DataConfig
from ..paths import UniqueNames, inside, safe_name
from .extract import ModelConfig

SALIENCY_METHODS = ["concept_attention", "cross_attention", "daam"]


# Nested config defaults must live on the class (a partial override rebuilds the section from it).
@dataclass
class MMDiTModelConfig(ModelConfig):
    id: str = field("tiny-flux", help="zoo name (tiny-flux, tiny-sd3; tiny-sd for daam), local pipeline folder or "
                                      "hub id")


@dataclass
class UNetModelConfig(ModelConfig):
    id: str = field("tiny-sd", help="UNet pipeline for daam: zoo name, local folder or hub id")


@dataclass
class SaliencyDataConfig(DataConfig):
    count: int | None = field(4, min=1, help="number of images (null: all)")
    split: str = field("test", help="train | test (shapes, digits, hf)")


@dataclass
class SaliencyConfig:
    model: MMDiTModelConfig = field(default_factory=MMDiTModelConfig, help="")
    method: str = field("concept_attention", help="concept_attention | cross_attention (MM-DiT: Flux, SD3) | "
                                                  "daam (UNet: SD 1.x/2.x/SDXL; on MM-DiTs the DiT cross-attention)")
    source: Literal["generate", "images"] = field("generate", help="generate (trace a pipeline call per prompt) | images (real images of "
                                         "`data`, noised to t, one denoiser call per seed)")
    prompts: list[str] = field(default_factory=lambda: ["a red circle and a blue square"],
                               help="prompts for source=generate")
    concepts: list[str] = field(default_factory=list,
                                help="concept_attention/cross_attention: concept words (any words; images: the "
                                     "data set's concepts when empty). daam: words of the prompt (empty: all)")
    data: SaliencyDataConfig = field(default_factory=SaliencyDataConfig,
                             help="images for source=images (captions from the data set)")
    steps: int = field(4, min=1, help="denoising steps for source=generate")
    guidance_scale: float | None = field(None, help="classifier-free guidance scale against the empty prompt (Flux without a guidance embedding: true CFG; null: the pipeline's default)")
    size: int = field(64, min=1, help="image side in pixels (generation height/width, real-image resize + crop)")
    seed: int = field(0, help="generation seed")
    t: int = field(500, min=0, max=999, help="source=images: noise timestep in [0, 1000) (flow models: sigma = t/1000)")
    seeds: list[int] = field(default_factory=lambda: [0], nonempty=True, help="source=images: noise seeds, maps averaged")
    layers: list[int] | None = field(None, help="concept methods: double-stream block indices to average "
                                                "(negative from the end; null: all)")
    include_mid: bool = field(False, help="daam on UNets: also trace the mid block")
    concept_encoding: Literal["reference", "first_token", "joined", "mean"] = field(
        "reference", help="concept methods: reference (Flux: first_token, SD3: joined) | first_token | joined (SD3) "
                          "| mean (mean of each concept's T5 tokens)")
    concept_modulation: Literal["reference", "zero_pooled", "prompt"] = field(
        "reference", help="concept methods: pooled vector of the concepts' temb: reference (Flux: zero_pooled, SD3: "
                          "prompt) | zero_pooled | prompt")
    daam_order: Literal["reference", "clamp_each_step"] = field(
        "reference", help="daam: reference (sum per layer/head, upsample + clamp at the end) | clamp_each_step")
    out: str = field("runs/saliency", help="output folder: <id>.npz (maps, concepts) and <id>.png overlays")
    progress: bool = field(True, help="show a progress bar")


def _slug(text: str, i: int) -> str:
    """File stem of the i-th prompt: its index (unique) and the prompt made safe (paths.safe_name), lower case."""
    return f"{i:04d}-" + safe_name(text.lower(), max_len=48, tag_changes=False)


def _check(cfg: SaliencyConfig) -> None:
    if cfg.method not in SALIENCY_METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; valid: {', '.join(SALIENCY_METHODS)}")
    if cfg.source not in ("generate", "images"):
        raise ConfigError(f"unknown source {cfg.source!r}; valid: generate, images")
    if cfg.source == "generate" and not cfg.prompts:
        raise ConfigError("source=generate needs at least one prompt (--prompts '[\"a red circle\"]')")
    if cfg.method != "daam" and cfg.source == "generate" and not cfg.concepts:
        raise ConfigError(f"{cfg.method} needs concepts: the concept list is empty (--concepts '[circle, background]')")


def _generate(pipe, cfg: SaliencyConfig, prompt: str, concepts: list[str]):
    """One traced generation: (image, maps (C, h, w) numpy, concept names)."""
    import torch

    from ..saliency import concept_attention, trace

    from ..zoo import generation_kwargs

    kw: dict[str, Any] = dict(num_inference_steps=cfg.steps, height=cfg.size, width=cfg.size,
                              generator=torch.Generator("cpu").manual_seed(cfg.seed),
                              **generation_kwargs(pipe, cfg.guidance_scale))
    if cfg.method == "daam":
        with trace(pipe, include_mid=cfg.include_mid, order=cfg.daam_order) as tc:
            image = pipe(prompt, **kw).images[0]
        words = concepts or list(dict.fromkeys(w for w, _ in tc.words()))
        return image, tc.word_maps(words).numpy(), words
    with concept_attention(pipe, concepts, layers=cfg.layers, baseline=cfg.method == "cross_attention",
                           encoding=cfg.concept_encoding, modulation=cfg.concept_modulation) as ca:
        image = pipe(prompt, **kw).images[0]
    maps = ca.maps() if cfg.method == "concept_attention" else ca.cross_attention_maps()
    return image, maps[0].numpy(), concepts


def _on_image(pipe, cfg: SaliencyConfig, image, caption: str, concepts: list[str]):
    from ..saliency.real_image import concept_attention_on_images, daam_on_images
    from ..saliency.words import normalise

    if cfg.method == "daam":
        tc = daam_on_images(pipe, [image], [caption], t=cfg.t, seeds=cfg.seeds, size=cfg.size,
                            include_mid=cfg.include_mid, order=cfg.daam_order)
        present = [w for w, _ in tc.words()]
        words = [c for c in concepts if normalise(c) in present] or list(dict.fromkeys(present))
        return tc.word_maps(words).numpy(), words
    ca = concept_attention_on_images(pipe, [image], concepts, [caption], t=cfg.t, seeds=cfg.seeds, size=cfg.size,
                                     layers=cfg.layers, baseline=cfg.method == "cross_attention",
                                     encoding=cfg.concept_encoding, modulation=cfg.concept_modulation)
    maps = ca.maps() if cfg.method == "concept_attention" else ca.cross_attention_maps()
    return maps[0].numpy(), concepts


@command("saliency", SaliencyConfig)
def saliency_cmd(cfg: SaliencyConfig) -> list[Path]:
    """Saliency maps (DAAM, ConceptAttention, DiT cross-attention) per image: .npz maps + PNG overlays."""
    from tqdm.auto import tqdm

    from ..datasets import load_dataset
    from ..saliency.io import save_maps, save_overlays
    from ..zoo import load_pipeline

    _check(cfg)
    pipe = load_pipeline(cfg.model.id, device=cfg.model.device, dtype=cfg.model.dtype)
    out = Path(cfg.out)
    written = []
    if cfg.source == "generate":
        items = [(_slug(p, i), p, None, list(cfg.concepts)) for i, p in enumerate(cfg.prompts)]
    else:
        ds = load_dataset(cfg.data)
        stems = UniqueNames()  # sample ids are data: one safe file name each, never a path out of `out`
        items = [(stems(s.id), s.caption, s, list(cfg.concepts) or list(s.concepts)) for s in ds.iter_samples()]
    for ident, prompt, sample, concepts in tqdm(items, desc=f"saliency {cfg.method}", disable=not cfg.progress):
        if not concepts and cfg.method != "daam":
            raise ConfigError(f"{ident}: no concepts; pass --concepts")
        if sample is None:
            image, maps, names = _generate(pipe, cfg, prompt, concepts)
        else:
            image = ImageOps.fit(sample.image, (cfg.size, cfg.size), Image.BICUBIC)  # what the model sees
            maps, names = _on_image(pipe, cfg, image, prompt, concepts)
        save_maps(inside(out, f"{ident}.npz"), maps, names, method=cfg.method, prompt=prompt, model=cfg.model.id)
        written.append(save_overlays(inside(out, f"{ident}.png"), image, maps, names, title=f"{cfg.method}: {prompt}"))
    print(f"wrote {len(written)} map file(s) and overlay(s) to {out}")
    return written


@dataclass
class SegmentConfig:
    model: MMDiTModelConfig = field(default_factory=MMDiTModelConfig,
                                    help="MM-DiT model for concept_attention and cross_attention")
    daam_model: UNetModelConfig = field(default_factory=UNetModelConfig, help="UNet model for daam")
    dataset: str = field("shapes", help="shapes | imagenet-seg (gtsegs_ijcv.mat) | voc (VOC2012 folder)")
    path: str | None = field(None, help="imagenet-seg: the .mat file; voc: the folder holding SegmentationClass/")
    synset_names: str | None = field(None, help="imagenet-seg: LOC_synset_mapping.txt for class names")
    split: str = field("val", help="voc: ImageSets/Segmentation/<split>.txt; shapes: train | test")
    count: int | None = field(16, min=1, help="number of images (null: all)")
    protocol: str = field("single", help="single (target map > its mean, binary metrics) | multi (argmax over "
                                         "concepts; voc/shapes)")
    methods: list[str] = field(default_factory=lambda: ["cross_attention", "concept_attention", "center_prior"],
                               nonempty=True, help="rows of the table: concept_attention, cross_attention, daam, center_prior "
                                            "(center_prior is always added: the baseline every method is shown beside)")
    background: list[str] = field(default_factory=lambda: ["background", "floor", "tree", "person", "grass", "face"],
                                  help="background concept words added after the image's classes")
    t: int = field(500, min=0, max=999, help="noise timestep in [0, 1000) (flow: sigma 0.5 at 500, as in the paper)")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], nonempty=True, help="noise seeds, maps averaged")
    size: int = field(64, min=1, help="model input side in pixels (images resized + centre-cropped)")
    layers: list[int] | None = field(None, help="double-stream block indices for the concept methods (null: all)")
    concept_encoding: Literal["reference", "first_token", "joined", "mean"] = field(
        "reference", help="concept methods: reference (Flux: first_token, SD3: joined) | first_token | joined (SD3) "
                          "| mean")
    concept_modulation: Literal["reference", "zero_pooled", "prompt"] = field(
        "reference", help="concept methods: reference (Flux: zero_pooled, SD3: prompt) | zero_pooled | prompt")
    daam_order: Literal["reference", "clamp_each_step"] = field("reference", help="daam aggregation order")
    seed: int = field(0, help="shapes world seed")
    label: str = field("shape", help="shapes: segment the objects' shape words (shape) or colour words (colour)")
    out: str = field("runs/segment", help="output folder: results.json and table.md")


def load_segmentation(cfg: SegmentConfig):
    """The data set ``cfg`` names, as an iterable of SegSample."""
    from ..segmentation import DATASETS, ImageNetSegmentation, PascalVOC, ShapesSegmentation

    if cfg.dataset == "shapes":
        return ShapesSegmentation(count=cfg.count or 64, size=cfg.size, seed=cfg.seed, split=cfg.split
                                  if cfg.split in ("train", "test") else "test", label=cfg.label)
    if cfg.dataset in ("imagenet-seg", "voc") and not cfg.path:
        raise ConfigError(f"dataset {cfg.dataset!r} needs --path (the local "
                          f"{'gtsegs_ijcv.mat file' if cfg.dataset == 'imagenet-seg' else 'VOC2012 folder'})")
    if cfg.dataset == "imagenet-seg":
        return ImageNetSegmentation(cfg.path, synset_names=cfg.synset_names, count=cfg.count)
    if cfg.dataset == "voc":
        return PascalVOC(cfg.path, split=cfg.split, count=cfg.count, single_class=cfg.protocol == "single")
    raise ConfigError(f"unknown dataset {cfg.dataset!r}; valid: {', '.join(DATASETS)}")


@command("segment", SegmentConfig)
def segment_cmd(cfg: SegmentConfig) -> dict[str, dict[str, float]]:
    """Zero-shot segmentation (ConceptAttention protocol): methods side by side in one table."""
    from ..saliency.io import write_text
    from ..segmentation import METHODS, evaluate, format_table
    from ..zoo import load_pipeline

    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise ConfigError(f"unknown or no methods {bad or cfg.methods}; valid: {', '.join(METHODS)}")
    if cfg.protocol not in ("single", "multi"):
        raise ConfigError(f"unknown protocol {cfg.protocol!r}; valid: single, multi")
    data = load_segmentation(cfg)
    pipes: dict[str, Any] = {}
    results = {}
    methods = list(dict.fromkeys(cfg.methods))
    if "center_prior" not in methods:  # the trivial baseline is always in the table (it costs no model call)
        methods.append("center_prior")
    for m in methods:
        mc = None if m == "center_prior" else (cfg.daam_model if m == "daam" else cfg.model)
        if mc is not None and mc.id not in pipes:
            pipes[mc.id] = load_pipeline(mc.id, device=mc.device, dtype=mc.dtype)
        results[m] = evaluate(data, m, pipes[mc.id] if mc else None, multiclass=cfg.protocol == "multi", t=cfg.t,
                              seeds=cfg.seeds, size=cfg.size, layers=cfg.layers, background=cfg.background,
                              total=cfg.count, options={"encoding": cfg.concept_encoding,
                                                        "modulation": cfg.concept_modulation, "order": cfg.daam_order})
    words = f" ({cfg.label} words)" if cfg.dataset == "shapes" else ""
    title = f"{cfg.dataset}{words}, {cfg.protocol}-class protocol, {cfg.model.id} / {cfg.daam_model.id}, t={cfg.t}, " \
            f"{len(cfg.seeds)} seed(s)"
    table = format_table(results, title)
    out = Path(cfg.out)
    write_text(out / "results.json", json.dumps({"results": results, "config": to_dict(cfg)}, indent=2))
    write_text(out / "table.md", table + "\n")
    print(table)
    return results
