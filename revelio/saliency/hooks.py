"""The seam every saliency method uses: swap diffusers attention processors inside a context manager.

Every install and removal goes through ``extraction.hooks.Hooks`` (the one hook helper of the project).

A method wraps each chosen attention module's processor with its own: the wrapper runs the
ORIGINAL processor unchanged (so the model's outputs are bit-identical) while forward hooks
on the projection layers (``to_q``, ``to_k``, ``to_out.0``, ...) record the tensors the method
needs, then does the method's extra work. The original processors come back on exit, also
when the body raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from extraction.hooks import Hooks


@contextmanager
def swapped_processors(modules: dict[str, nn.Module], make: Callable[[str, nn.Module, Any], Any]) -> Iterator[None]:
    """Give each attention module ``make(name, module, original_processor)`` as processor; restore on exit."""
    with Hooks() as hooks:
        for name, m in modules.items():
            hooks.processor(m, make(name, m, m.processor))
        yield


@contextmanager
def captured(**layers: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record what named layers see while the body runs.

    ``captured(q=attn.to_q, o=attn.to_out[0])`` yields a dict that fills with each layer's
    OUTPUT, except for names starting with ``in_`` which record the layer's INPUT
    (a forward pre-hook). Only the first call of each layer in the body is kept.
    """
    out: dict[str, torch.Tensor] = {}

    def post(name):
        def hook(_m, _args, result):
            out.setdefault(name, result)
        return hook

    def pre(name):
        def hook(_m, args):
            out.setdefault(name, args[0])
        return hook

    with Hooks() as hooks:
        for name, layer in layers.items():
            if name.startswith("in_"):
                hooks.pre(layer, pre(name))
            else:
                hooks.forward(layer, post(name))
        yield out


@contextmanager
def hooked(module: nn.Module, pre: Callable | None = None, post: Callable | None = None,
           with_kwargs: bool = False) -> Iterator[None]:
    """Attach a forward pre-hook and/or forward hook to ``module`` for the body only."""
    with Hooks() as hooks:
        if pre is not None:
            hooks.pre(module, pre, with_kwargs=with_kwargs)
        if post is not None:
            hooks.forward(module, post, with_kwargs=with_kwargs)
        yield


class ConditionalRows:
    """Which batch rows of each denoiser call are conditional, so traces skip classifier-free guidance's negatives.

    Diffusers pipelines run CFG either as ONE batch ``cat([x, x])`` with [unconditional,
    conditional] text, whose two latent halves are exactly equal (SD, SDXL, SD3), or as TWO
    calls per step on the same latents, conditional first (Flux's true CFG). ``rows`` returns
    the conditional half in the first case, ``None`` (skip the call) for the second call of
    the second case, and every row otherwise. ``cfg`` forces the batch case on (True) or
    turns both detections off (False, e.g. for real-image calls).
    """

    def __init__(self, cfg: bool | None = None):
        self.cfg = cfg
        self._prev: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def rows(self, latent_input: torch.Tensor, text: torch.Tensor | None) -> slice | None:
        b = latent_input.shape[0]
        if self.cfg is False:
            return slice(0, b)
        prev, self._prev = self._prev, (latent_input, text)
        if self.cfg is None and prev is not None and prev[0].shape == latent_input.shape \
                and torch.equal(prev[0], latent_input) and text is not None and prev[1] is not None \
                and not (prev[1].shape == text.shape and torch.equal(prev[1], text)):
            return None  # same latents, other text: the unconditional call of a two-call CFG step
        half = b // 2
        if self.cfg or (b % 2 == 0 and b > 0 and torch.equal(latent_input[:half], latent_input[half:])):
            return slice(half, b)
        return slice(0, b)


class HookSession:
    """Base of the tracers: ``_install(stack)`` registers hooks and processors on an ExitStack;
    entering installs them all (or none: a failure undoes the ones already in), leaving removes them."""

    _stack: ExitStack | None = None

    def _install(self, stack: ExitStack) -> None:
        raise NotImplementedError

    def __enter__(self):
        stack = ExitStack()
        try:
            self._install(stack)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
