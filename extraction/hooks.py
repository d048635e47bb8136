"""Every hook the project installs goes through ``Hooks``; ``ActivationCapture`` collects activations with it.

``Hooks(root)`` installs forward hooks, forward pre-hooks and attention-processor swaps on modules named
by their ``root.named_modules()`` path (or given as modules), and removes every one of them on exit, also
when the body raises; a wrong name is a ``KeyError`` with the close matches and the valid names. The
extraction hooks, the saliency tracers (``revelio.saliency.hooks``) and steering all use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, close_match_error

CAPTURES = ("output", "input", "delta")
POOLINGS = ("none", "mean")


class Hooks:
    """Hooks and processor swaps on modules of ``root``, all undone by ``remove()`` (or on leaving ``with``).

    ``forward(target, fn)`` / ``pre(target, fn)`` register a forward hook / forward pre-hook
    (``with_kwargs`` as in torch); ``processor(target, proc)`` gives a diffusers attention module another
    processor and puts the original back on removal. ``target`` is a module or its dotted name under
    ``root``; ``shown`` are the names an error lists first (default: all). Removal runs in reverse order of
    installation, runs every step even when one fails, and may be called any number of times.
    """

    def __init__(self, root: nn.Module | None = None, shown: Sequence[str] | None = None):
        self.root, self.shown = root, shown
        self._modules: dict[str, nn.Module] | None = None
        self._undo: list[Callable[[], Any]] = []

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self._undo)

    def module(self, target: str | nn.Module) -> nn.Module:
        """``target`` itself, or the submodule of ``root`` it names (KeyError with close matches otherwise)."""
        if isinstance(target, nn.Module):
            return target
        if self.root is None:
            raise TypeError(f"module name {target!r} given, but these hooks have no root module to look it up in")
        if self._modules is None:
            self._modules = dict(self.root.named_modules())
        if target not in self._modules:
            valid = [n for n in self._modules if n]
            raise close_match_error("module", str(target), valid, self.shown)
        return self._modules[target]

    def forward(self, target: str | nn.Module, fn: Callable, *, with_kwargs: bool = False) -> Any:
        """Register ``fn`` as a forward hook of ``target``; returns torch's handle."""
        handle = self.module(target).register_forward_hook(fn, with_kwargs=with_kwargs)
        self._undo.append(handle.remove)
        return handle

    def pre(self, target: str | nn.Module, fn: Callable, *, with_kwargs: bool = False) -> Any:
        """Register ``fn`` as a forward pre-hook of ``target``; returns torch's handle."""
        handle = self.module(target).register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        self._undo.append(handle.remove)
        return handle

    def processor(self, target: str | nn.Module, proc: Any) -> Any:
        """Give the attention module ``target`` the processor ``proc``; returns the original (restored on removal)."""
        m = self.module(target)
        if not hasattr(m, "set_processor"):
            raise TypeError(f"{type(m).__name__} has no attention processor to swap (no set_processor)")
        original = m.processor
        m.set_processor(proc)
        self._undo.append(lambda: m.set_processor(original))
        return original

    def remove(self) -> None:
        """Undo everything installed, newest first; every step runs even if one raises (the first error is raised)."""
        error: BaseException | None = None
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except BaseException as e:  # noqa: BLE001 - finish removing, then report
                error = error or e
        if error is not None:
            raise error


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
        self._hooks = Hooks(adapter.denoiser, shown=adapter.block_names())

    def __enter__(self) -> ActivationCapture:
        try:
            for name in self.hooks:
                self._hooks.forward(name, self._hook(name), with_kwargs=True)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        self._hooks.remove()

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
