"""The SAE folder: ``sae.safetensors`` + ``cfg.json`` with SAELens tensor names and shapes.

Saved weights act on RAW activations: the input normalisation x_n = s x is folded in
(W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b_dec / s), so any SAELens-style reader gets
the same codes and a reconstruction in raw units. ``cfg.json`` keeps s (``norm_scale``) and
``load`` unfolds it again, restoring the unit-norm decoder of training.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from extraction.files import OutputError, fix_mode, make_tmp, write_failed
from safetensors.torch import load_file, save_file

from .model import ARCHITECTURES, SparseAutoencoder

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
FORMAT_VERSION = 1


def save(model: SparseAutoencoder, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``folder`` atomically (a temp folder renamed into place); ``extra`` goes into cfg.json."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    s = float(model.norm_scale)
    tensors = {
        "W_enc": (model.W_enc.detach() * s).float().cpu().contiguous(),
        "W_dec": (model.W_dec.detach() / s).float().cpu().contiguous(),
        "b_enc": model.b_enc.detach().float().cpu().contiguous(),
        "b_dec": (model.b_dec.detach() / s).float().cpu().contiguous(),
    }
    cfg = {
        "format_version": FORMAT_VERSION,
        "d_in": model.d_in, "d_sae": model.d_sae, "k": model.k,
        "architecture": model.architecture,
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": model.k},
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # weights already act on raw activations (s folded in)
        "norm_scale": s, "norm_folded": True,
        "threshold": float(model.threshold),
        "matryoshka_prefixes": model.prefixes,
        "k_aux": model.k_aux, "aux_coef": model.aux_coef, "dead_after": model.dead_after,
        "dtype": "float32", "device": "cpu",
    }
    cfg.update(extra or {})
    if "hook" in cfg:
        cfg.setdefault("hook_name", cfg["hook"])
    tmp = make_tmp(folder, folder=True)  # the umask's permissions, not mkdtemp's 0700
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        fix_mode(tmp / WEIGHTS)  # safetensors creates it 0600 whatever the umask
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, (OutputError, ValueError, TypeError)):
            raise write_failed(e, "writing", folder / WEIGHTS) from e  # a full disk, an I/O error: name the file
        raise
    return folder


def load(folder: str | Path, device: str | torch.device = "cpu", d_in: int | None = None) -> SparseAutoencoder:
    """Load an SAE folder (ours or SAELens's TopK): a module with ``encode``, ``decode``, ``forward`` and ``cfg``.

    ``d_in``, when given, must match the saved width (fails clearly otherwise).
    """
    folder = Path(folder)
    if not (folder / WEIGHTS).exists() or not (folder / CONFIG).exists():
        raise FileNotFoundError(f"{folder} is not an SAE folder: it needs {WEIGHTS} and {CONFIG}")
    cfg = json.loads((folder / CONFIG).read_text())
    t = load_file(str(folder / WEIGHTS))
    missing = [n for n in ("W_enc", "W_dec", "b_enc", "b_dec") if n not in t]
    if missing:
        raise ValueError(f"{folder / WEIGHTS} lacks tensors {missing}; found {sorted(t)}")
    saved_in, d_sae = t["W_enc"].shape
    if t["W_dec"].shape != (d_sae, saved_in):
        raise ValueError(f"W_dec has shape {tuple(t['W_dec'].shape)}, expected {(d_sae, saved_in)} (d_sae, d_in)")
    if d_in is not None and d_in != saved_in:
        raise ValueError(f"d_in mismatch: the SAE in {folder} was trained on d_in={saved_in}, the data has d_in={d_in}")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if k is None:
        raise ValueError(f"{folder / CONFIG} names no k (neither 'k' nor 'activation_fn_kwargs.k')")
    arch = cfg.get("architecture", "topk")
    if arch not in ARCHITECTURES and cfg.get("activation_fn_str") == "topk":  # SAELens "standard" + topk activation
        arch = "topk"
    model = SparseAutoencoder(saved_in, d_sae, int(k), architecture=arch,
                              matryoshka=cfg.get("matryoshka_prefixes") or (),
                              k_aux=cfg.get("k_aux"), aux_coef=cfg.get("aux_coef", 1 / 32),
                              dead_after=cfg.get("dead_after", 10_000_000))
    s = float(cfg.get("norm_scale", 1.0)) if cfg.get("norm_folded", False) else 1.0
    with torch.no_grad():
        model.W_enc.copy_(t["W_enc"] / s)
        model.W_dec.copy_(t["W_dec"] * s)
        model.b_enc.copy_(t["b_enc"])
        model.b_dec.copy_(t["b_dec"] * s)
        model.norm_scale.fill_(s)
        model.threshold.fill_(float(cfg.get("threshold", -1.0)))
    model.cfg = cfg
    return model.to(device).eval()
