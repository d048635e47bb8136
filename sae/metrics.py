"""Evaluation metrics of an SAE over a stream of batches: FVU, L0, dead fraction, feature density.

FVU over a whole split is SSE / SST with SST = sum ||x||^2 - n ||mean(x)||^2, so it can be summed
batch by batch (and across DDP ranks) and equals the FVU of the concatenated split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from .model import SparseAutoencoder


class EvalAccumulator:
    """Running sums for FVU, L0 and per-latent firing counts; ``reduce`` merges DDP ranks."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str = "cpu"):
        f64 = dict(dtype=torch.float64, device=device)
        self.sums = {"sse": torch.zeros((), **f64), "sq": torch.zeros((), **f64), "n": torch.zeros((), **f64),
                     "active": torch.zeros((), **f64), "x": torch.zeros(d_in, **f64), "fires": torch.zeros(d_sae, **f64)}

    @torch.no_grad()
    def update(self, model: SparseAutoencoder, x: Tensor, t_index: Tensor | None = None) -> None:
        """Encode/decode a batch of raw activations in eval mode and add its sums (``t_index``: the samples'
        timestep indices, for timestep-aware SAEs)."""
        xn = x.to(model.W_enc) * model.norm_scale
        codes = model.encode_sparse(xn, t_index=t_index)
        x_hat = model.decode_sparse(codes)
        s = self.sums
        s["sse"] += (xn - x_hat).double().pow(2).sum()
        s["sq"] += xn.double().pow(2).sum()
        s["x"] += xn.double().sum(0)
        s["n"] += x.shape[0]
        live = codes.values > 0
        s["active"] += live.sum()
        s["fires"] += torch.bincount(codes.latents[live], minlength=s["fires"].shape[0]).double()

    def merge(self, other: "EvalAccumulator") -> "EvalAccumulator":
        """Add another accumulator's sums (every sum is additive: the merged result is that of both splits)."""
        for k, v in other.sums.items():
            self.sums[k] = self.sums[k] + v
        return self

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Sum every running total across processes with the given all-reduce."""
        self.sums = {k: all_reduce_sum(v) for k, v in self.sums.items()}

    def result(self) -> dict[str, float | np.ndarray]:
        """fvu, explained_variance, l0, dead_fraction (never fired on the split), density (per latent), n_samples."""
        s = self.sums
        n = float(s["n"])
        if n == 0:
            raise ValueError("no samples were evaluated (empty split)")
        sst = float(s["sq"]) - float(s["x"].pow(2).sum()) / n
        fvu = float(s["sse"]) / max(sst, 1e-12)
        density = (s["fires"] / n).cpu().numpy()
        return {"fvu": fvu, "explained_variance": 1.0 - fvu, "l0": float(s["active"]) / n,
                "dead_fraction": float((s["fires"] == 0).double().mean()), "density": density, "n_samples": int(n)}


def evaluate(model: SparseAutoencoder, batches: Iterable, device: torch.device | str = "cpu",
             timesteps: list[int] | None = None) -> dict:
    """Metrics of ``model`` over ``batches`` of raw activations (one process).

    Batches are tensors, or (x, rows, timestep index) tuples of a several-timestep data module; with
    ``timesteps`` given, the result also holds ``per_timestep`` {t: metrics without density}."""
    model = model.to(device).eval()
    per = [EvalAccumulator(model.d_in, model.d_sae, device) for _ in (timesteps or [None])]
    for b in batches:
        if isinstance(b, (tuple, list)):
            x, tix = b[0], (b[2] if len(b) > 2 else None)
        else:
            x, tix = b, None
        x = x.to(device)
        if tix is None or timesteps is None:
            per[0].update(model, x, None if tix is None else tix.to(device))
            continue
        tix = tix.to(device)
        for i in torch.unique(tix).tolist():
            m = tix == i
            per[i].update(model, x[m], tix[m])
    acc = EvalAccumulator(model.d_in, model.d_sae, device)
    for a in per:
        acc.merge(a)
    res = acc.result()
    if timesteps is not None:
        res["per_timestep"] = {int(t): {k: v for k, v in a.result().items() if k != "density"}
                               for t, a in zip(timesteps, per) if float(a.sums["n"]) > 0}
    return res


def log10_density(density: np.ndarray, floor: float = 1e-10) -> np.ndarray:
    """log10 of firing frequencies, dead latents at log10(floor)."""
    return np.log10(np.asarray(density, dtype=np.float64) + floor)
