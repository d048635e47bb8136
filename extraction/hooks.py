"""Forward hooks on named denoiser modules, as a context manager that always removes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .adapters import Adapter

CAPTURES = ("output", "input", "delta")
POOLINGS = ("none", "mean")


class ActivationCapture:
    """Collect the image-spatial activation of each hooked module during ONE denoiser call.

    ``capture``: ``output``, ``input`` or ``delta`` (output - input). ``pooling``: ``none`` keeps
    maps (B, C, H, W) or tokens (B, T, C); ``mean`` averages them to (B, C). Tensors are moved
    to ``device`` (None: stay where computed) in ``dtype`` inside the hook, so nothing else of the
    graph is kept alive.
    """

    def __init__(self, adapter: Adapter, hooks: Sequence[str], capture: str = "output", pooling: str = "none",
                 dtype: torch.dtype = torch.float32, device: str | None = "cpu"):
        if capture not in CAPTURES:
            raise ValueError(f"capture {capture!r} is not one of {', '.join(CAPTURES)}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        adapter.check_hooks(hooks)
        self.adapter, self.hooks, self.capture, self.pooling = adapter, list(hooks), capture, pooling
        self.dtype, self.device = dtype, device
        self.n_img: int | None = None
        self.acts: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ActivationCapture:
        modules = dict(self.adapter.denoiser.named_modules())
        try:
            for name in self.hooks:
                self._handles.append(modules[name].register_forward_hook(self._hook(name), with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self, n_img: int | None) -> None:
        """Prepare for the next call; ``n_img`` is the number of image tokens (None for UNets)."""
        self.n_img = n_img
        self.acts = {}

    def _hook(self, name: str):
        def fn(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if name in self.acts:
                raise RuntimeError(f"module {name!r} ran twice in one forward pass; hook a module that runs once")
            if self.capture == "input":
                x = self.adapter.hook_input(args, kwargs, self.n_img)
            else:
                x = self.adapter.image_part(output, self.n_img)
                if self.capture == "delta":
                    x_in = self.adapter.hook_input(args, kwargs, self.n_img)
                    if x_in.shape != x.shape:
                        raise ValueError(f"capture 'delta' needs equal input and output shapes, but {name!r} maps "
                                         f"{tuple(x_in.shape)} -> {tuple(x.shape)}; use 'output' or 'input' there")
                    x = x - x_in
            x = x.detach()
            if x.ndim not in (3, 4):
                raise ValueError(f"hook {name!r} gives a {x.ndim}-d tensor {tuple(x.shape)}; expected maps "
                                 "(B, C, H, W) or tokens (B, T, C)")
            if self.pooling == "mean":
                x = x.float().mean(dim=(2, 3) if x.ndim == 4 else 1)
            self.acts[name] = x.to(self.device or x.device, self.dtype)

        return fn
