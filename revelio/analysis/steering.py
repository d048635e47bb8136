"""Steering: add or remove an SAE latent's decoder direction at its hook while a pipeline generates.

The latent's direction in raw activation units is ``d = decode(e_l) - decode(0)`` (W_dec[l]
divided by the SAE's input normalisation), so a coefficient means the same as the latent's
own activation value. At every position p of the hooked module's image output x (inside the
chosen region and denoising steps):

* ``add``:    x_p <- x_p + scale * m_p * d
* ``remove``: x_p <- x_p - scale * m_p * z_l(x_p) * d   (z_l: the latent's code at p; scale 1 removes it)

``m`` is the spatial mask on the hook's grid (all ones by default). Generation runs twice
with the same seed, without and with the hook, to show before/after.

Steps are the pipeline's denoising (scheduler) steps, counted by wrapping ``scheduler.step``:
step i is every denoiser call made before the i-th scheduler update, however many calls a step
makes. Under classifier-free guidance *both* passes of a step are steered, the conditional and
the unconditional one: the intervention edits the denoiser itself, so the guided prediction is
that of the steered model. This holds alike for batched CFG (SD, SD3: one call on
[uncond, cond]) and for Flux's true CFG (two calls per step, conditional first).
"""

from __future__ import annotations

import functools

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import metrics as M

MODES = ("add", "remove")


@dataclass
class SteeringSpec:
    """One intervention: ``latent``, ``scale``, ``mode`` (add | remove), optional ``mask`` (any-size (H, W) weights
    in [0, 1], resized to the hook's grid) and ``steps`` ([start, end) denoising-step indices, counted as scheduler
    steps; every denoiser call of a steered step is steered, conditional and unconditional; None: all)."""

    latent: int
    scale: float = 4.0
    mode: str = "add"
    mask: np.ndarray | None = None
    steps: tuple[int, int] | None = None

    def check(self, d_sae: int) -> None:
        if self.mode not in MODES:
            raise ValueError(f"steering mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not 0 <= int(self.latent) < d_sae:
            raise ValueError(f"latent {self.latent} is out of range for an SAE with d_sae={d_sae}")
        if self.steps is not None and (len(self.steps) != 2 or self.steps[0] >= self.steps[1] or self.steps[0] < 0):
            raise ValueError(f"steps must be [start, end) with 0 <= start < end, got {list(self.steps)}")
        if self.mask is not None and np.asarray(self.mask).ndim != 2:
            raise ValueError(f"mask must be a 2-d (H, W) array, got shape {np.asarray(self.mask).shape}")

    def active(self, step: int) -> bool:
        return self.steps is None or self.steps[0] <= step < self.steps[1]


def box_mask(box: Sequence[float], size: int = 64) -> np.ndarray:
    """A (size, size) mask that is 1 inside ``box`` = [top, bottom, left, right] given as fractions of the image."""
    if len(box) != 4 or not all(0.0 <= float(v) <= 1.0 for v in box) or box[0] >= box[1] or box[2] >= box[3]:
        raise ValueError(f"box must be [top, bottom, left, right] fractions in [0, 1] with top < bottom and "
                         f"left < right, got {list(box)}")
    m = np.zeros((size, size), dtype=np.float32)
    t, b, l, r = (int(round(float(v) * size)) for v in box)
    m[t:max(b, t + 1), l:max(r, l + 1)] = 1.0
    return m


def latent_direction(model: Any, latent: int) -> torch.Tensor:
    """The latent's decoder direction in raw activation units: decode(e_l) - decode(0), shape (d_in,)."""
    dev = next(model.parameters()).device
    e = torch.zeros(2, model.d_sae, device=dev)
    e[0, latent] = 1.0
    with torch.no_grad():
        out = model.decode(e)
    return (out[0] - out[1]).float()


class Steering:
    """Context manager: while active, the SAE's hook module is steered by ``specs`` in their denoising steps.

    ``step`` is the current denoising step (scheduler updates so far); after a run, ``calls_per_step``
    counts the denoiser calls of each step and ``steered_per_step`` the hook outputs that were steered.
    """

    def __init__(self, pipe: Any, model: Any, specs: Sequence[SteeringSpec], hook: str | None = None):
        from extraction.adapters import get_adapter

        from .feature_maps import sae_site

        self.adapter = get_adapter(pipe)
        self.model = model
        self.hook = hook or sae_site(model)[0]
        self.adapter.check_hooks([self.hook])
        self.specs = list(specs)
        for s in self.specs:
            s.check(model.d_sae)
        self.directions = [latent_direction(model, s.latent) for s in self.specs]
        self.step = 0
        self.calls_per_step: Counter[int] = Counter()
        self.steered_per_step: Counter[int] = Counter()
        self.grid: tuple[int, int] | None = None
        self.n_img: int | None = None
        self._hooks: Any = None

    def __enter__(self) -> Steering:
        from extraction.hooks import Hooks

        den = self.adapter.denoiser
        self._hooks = Hooks(den, shown=self.adapter.block_names())
        self.step = 0
        self.calls_per_step.clear()
        self.steered_per_step.clear()
        try:
            self._wrap_scheduler()
            self._hooks.pre(den, self._on_call, with_kwargs=True)
            self._hooks.forward(self.hook, self._on_output)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._hooks is not None:
                self._hooks.remove()
        finally:
            self._unwrap_scheduler()

    _scheduler: Any = None
    _own_step: Any = None  # an instance attribute 'step' the scheduler had before (restored on exit)

    def _wrap_scheduler(self) -> None:
        """Count denoising steps: each ``scheduler.step`` call ends one (undone by ``__exit__``)."""
        sched = getattr(self.adapter.pipe, "scheduler", None)
        if sched is None or not hasattr(sched, "step"):
            return
        self._scheduler, self._own_step = sched, vars(sched).get("step")
        inner = sched.step

        # functools.wraps keeps the signature visible: pipelines pass `generator` / `eta` only when
        # inspect.signature(scheduler.step) lists them (prepare_extra_step_kwargs), so a bare
        # (*args, **kwargs) wrapper would silently drop the seeded generator of DDPM/DDIM steps.
        @functools.wraps(inner)
        def step(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            self.step += 1
            return out

        sched.step = step

    def _unwrap_scheduler(self) -> None:
        sched, self._scheduler = self._scheduler, None
        if sched is None:
            return
        if self._own_step is not None:
            sched.step = self._own_step
        else:
            vars(sched).pop("step", None)  # the class's own method again

    def _on_call(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Count the step's denoiser calls and note the image-token grid of the call (the adapter's answer)."""
        self.calls_per_step[self.step] += 1
        self.grid = self.adapter.token_grid(args, kwargs)
        self.n_img = self.adapter.n_tokens(self.grid)  # None for UNets: their maps are (B, C, H, W)

    @torch.no_grad()
    def _on_output(self, module: Any, args: tuple, output: Any) -> None:
        todo = [(s, d) for s, d in zip(self.specs, self.directions) if s.active(self.step)]
        if not todo:
            return
        self.steered_per_step[self.step] += 1
        x = self.adapter.image_part(output, self.n_img)  # a view into the output: edited in place
        if x.ndim == 4:  # (B, C, H, W) -> positions last
            grid = (x.shape[-2], x.shape[-1])
            tokens = x.permute(0, 2, 3, 1)
        else:  # (B, T, C)
            grid = self.grid
            tokens = x.unflatten(1, grid)
        for spec, d in todo:
            d = d.to(x.device, x.dtype)
            m = torch.ones(grid, device=x.device, dtype=x.dtype) if spec.mask is None else \
                torch.from_numpy(M.resize_maps(np.asarray(spec.mask, dtype=np.float32), grid)).to(x.device, x.dtype)
            if spec.mode == "add":
                coef = spec.scale * m.expand(tokens.shape[0], *grid)
            else:
                z = self.model.encode(tokens.reshape(-1, tokens.shape[-1]).float())[:, spec.latent]
                coef = spec.scale * m * z.view(tokens.shape[0], *grid).to(x.dtype)
            sign = 1.0 if spec.mode == "add" else -1.0
            tokens.add_(sign * coef[..., None] * d)


def generate(pipe: Any, prompt: str, seed: int = 0, steps: int = 20, guidance_scale: float = 5.0,
             size: int | None = None) -> Image.Image:
    """One image from ``pipe`` with a seeded generator (the same call is made before and after steering)."""
    from extraction.adapters import get_adapter

    kw: dict[str, Any] = {"num_inference_steps": steps, "generator": torch.Generator("cpu").manual_seed(seed),
                          **get_adapter(pipe).generation_kwargs(guidance_scale)}
    if size is not None:
        kw["height"] = kw["width"] = size
    return pipe(prompt, **kw).images[0]


def steer(pipe: Any, model: Any, prompt: str, specs: Sequence[SteeringSpec], seed: int = 0, steps: int = 20,
          guidance_scale: float = 5.0, size: int | None = None,
          hook: str | None = None) -> tuple[Image.Image, Image.Image]:
    """(before, after): the same seeded generation without and with the steering ``specs``."""
    steering = Steering(pipe, model, specs, hook)  # validates the specs before any generation
    before = generate(pipe, prompt, seed, steps, guidance_scale, size)
    with steering:
        after = generate(pipe, prompt, seed, steps, guidance_scale, size)
    return before, after
