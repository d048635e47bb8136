"""Where in an image each SAE latent fires: (d_sae, h, w) maps from a store or straight from a pipeline.

An SAE trained on per-position tokens encodes every spatial position of a hooked feature map
on its own; putting the codes back on the (h, w) grid gives one activation map per latent.
From a store the positions are read with ``ActivationStore.tokens``; on the fly the very same
extraction code (``extraction.run.Extractor.compute``) runs one hooked denoiser call, so a map
computed either way is the same for the same image, seed and timestep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import from_dict
from ..datasets import DataConfig, ImageDataset, Sample, load_dataset


def sae_site(model: Any) -> tuple[str, int]:
    """(hook, timestep) the SAE was trained on, from its cfg.json."""
    cfg = getattr(model, "cfg", {}) or {}
    hook = cfg.get("hook", cfg.get("hook_name"))
    t = cfg.get("timestep")
    if hook is None or t is None:
        raise ValueError(f"the SAE's cfg has no hook/timestep (keys: {', '.join(sorted(cfg))}); pass hook= and t=")
    return str(hook), int(t)


@torch.no_grad()
def encode_tokens(model: Any, tokens: np.ndarray | torch.Tensor, batch_size: int = 4096) -> np.ndarray:
    """Dense SAE codes (n, d_sae) float32 of raw activations (n, d_in), ``batch_size`` rows at a time."""
    x = torch.as_tensor(np.asarray(tokens, dtype=np.float32)) if isinstance(tokens, np.ndarray) else tokens.float()
    if x.ndim != 2 or x.shape[1] != model.d_in:
        raise ValueError(f"tokens of shape {tuple(x.shape)} do not fit an SAE with d_in={model.d_in}")
    dev = next(model.parameters()).device
    out = [model.encode(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, x.shape[0], batch_size)]
    return (torch.cat(out) if out else torch.zeros(0, model.d_sae)).numpy()


def require_spatial(store: Any, hook: str, t: int) -> None:
    if store.layout(hook, t) == "NC":
        raise ValueError(f"{hook!r} at t={t} is stored pooled (layout NC): feature maps need per-position "
                         "activations; extract again with pooling: none")


def store_feature_maps(store: Any, model: Any, rows: Sequence[int] | np.ndarray, hook: str | None = None,
                       t: int | None = None, latents: Sequence[int] | None = None,
                       max_positions: int = 8192) -> np.ndarray:
    """Maps (n, L, h, w) of ``latents`` (default: all d_sae) for store ``rows`` (increasing), at the SAE's site.

    Rows are encoded in chunks of at most ``max_positions`` positions, so the dense codes held at
    once stay bounded whatever the image count.
    """
    if hook is None or t is None:
        hook, t = sae_site(model)
    require_spatial(store, hook, t)
    h, w = store.spatial(hook, t)
    rows = np.asarray(rows, dtype=np.int64)
    keep = None if latents is None else np.asarray(latents, dtype=np.int64)
    step = max(1, max_positions // (h * w))
    parts = []
    for i in range(0, len(rows), step):
        x, _ = store.tokens(hook, t, rows[i:i + step])
        codes = encode_tokens(model, x)
        parts.append(codes if keep is None else codes[:, keep])
    width = model.d_sae if keep is None else len(keep)
    codes = np.concatenate(parts) if parts else np.zeros((0, width), dtype=np.float32)
    return codes.reshape(len(rows), h, w, width).transpose(0, 3, 1, 2)


def extract_config(store: Any) -> Any:
    """The extraction config a store was written with (``revelio extract``'s dataclass, which is also its plan)."""
    from ..extraction_config import ExtractConfig

    return from_dict(ExtractConfig, store.config)


def store_dataset(store: Any) -> ImageDataset:
    """The data set a store was extracted from, rebuilt from its config (to show or score its images)."""
    data = store.config.get("data")
    if not isinstance(data, dict):
        raise ValueError(f"{store.path} holds no data-set config; images cannot be re-rendered")
    return load_dataset(from_dict(DataConfig, data))


def store_samples(store: Any, rows: Sequence[int], dataset: ImageDataset | None = None) -> list[Sample]:
    """The data-set samples (image, caption, masks) behind store ``rows``, matched by image id."""
    ds = dataset if dataset is not None else store_dataset(store)
    index = {sid: i for i, sid in enumerate(ds.ids())}
    ids = store.ids
    missing = [str(ids[r]) for r in rows if str(ids[r]) not in index]
    if missing:
        raise KeyError(f"image ids {missing[:3]} of {store.path} are not in data set {ds.name!r} "
                       f"({len(ds)} images); was the store extracted from another data set?")
    return [ds[index[str(ids[r])]] for r in rows]


class OnTheFly:
    """Feature maps computed live from a pipeline, with the same preprocessing, prompt and noise as extraction.

    ``plan`` is an ``extraction.config.ExtractionPlan``; ``OnTheFly.from_store`` rebuilds the one a
    store was written with, so maps match the stored ones exactly.
    """

    def __init__(self, pipe: Any, model: Any, plan: Any, hook: str | None = None, t: int | None = None):
        from extraction.run import Extractor

        self.model = model
        self.hook, self.t = (hook, int(t)) if hook is not None and t is not None else sae_site(model)
        plan.hooks, plan.timesteps, plan.pooling = [self.hook], [self.t], "none"
        self.plan = plan
        self.extractor = Extractor(pipe, plan)
        self.class_names: list[str] = []

    @classmethod
    def from_store(cls, pipe: Any, model: Any, store: Any) -> OnTheFly:
        otf = cls(pipe, model, extract_config(store))
        otf.class_names = list(store_dataset(store).class_names)
        return otf

    def prompts(self, samples: Sequence[Sample]) -> list[str]:
        from extraction.run import make_prompt

        return [make_prompt(self.plan.prompt, self.plan.template, s.caption, int(s.label), self.class_names)
                for s in samples]

    @torch.no_grad()
    def maps(self, images: Sequence[Image.Image], ids: Sequence[str], prompts: Sequence[str]) -> np.ndarray:
        """Maps (B, d_sae, h, w) of ``images``; ``ids`` seed the noise exactly as in extraction."""
        acts = self.extractor.compute(list(images), list(ids), list(prompts))[(self.hook, self.t)]
        spec = self.extractor.specs({(self.hook, self.t): acts})[0]
        if spec.layout == "NC":
            raise ValueError(f"hook {self.hook!r} gives a pooled activation; feature maps need a spatial one")
        x = acts.float()
        tokens = x.flatten(2).transpose(1, 2) if spec.layout == "NCHW" else x  # (B, P, C)
        b, p, c = tokens.shape
        codes = encode_tokens(self.model, tokens.reshape(b * p, c))
        h, w = spec.spatial
        return codes.reshape(b, h, w, -1).transpose(0, 3, 1, 2)

    def sample_maps(self, samples: Sequence[Sample]) -> np.ndarray:
        """Maps (B, d_sae, h, w) of data-set samples (their ids seed the noise, their captions/labels the prompt)."""
        return self.maps([s.image for s in samples], [s.id for s in samples], self.prompts(samples))
