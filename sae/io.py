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
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import ARCHITECTURES, SparseAutoencoder

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
FORMAT_VERSION = 1


class SAEFileError(ValueError):
    """An SAE folder whose files are missing, unreadable or contradict each other; the message names the file."""


def read_cfg(folder: str | Path) -> dict[str, Any]:
    """``folder/cfg.json`` as a dict; a missing file, bad JSON or a non-object is an error naming the file."""
    path = Path(folder) / CONFIG
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"SAE folder {str(folder)!r} does not exist")
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not an SAE folder: {path} is missing")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFileError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise SAEFileError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load(folder: str | Path, device: str | torch.device = "cpu", d_in: int | None = None) -> SparseAutoencoder:
    """Load an SAE folder (ours or SAELens's TopK): a module with ``encode``, ``decode``, ``forward`` and ``cfg``.

    ``d_in``, when given, must match the saved width (fails clearly otherwise).
    """
    folder = Path(folder)
    cfg = read_cfg(folder)
    if not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"{folder} is not an SAE folder: {folder / WEIGHTS} is missing")
    try:
        t = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, RuntimeError) as e:  # truncated, random bytes, bad header
        raise SAEFileError(f"{folder / WEIGHTS} is not a readable safetensors file ({e})") from e
    missing = [n for n in ("W_enc", "W_dec", "b_enc", "b_dec") if n not in t]
    if missing:
        raise SAEFileError(f"{folder / WEIGHTS} lacks tensors {missing}; found {sorted(t)}")
    if t["W_enc"].ndim != 2:
        raise SAEFileError(f"{folder / WEIGHTS}: W_enc must be 2-D (d_in, d_sae), got shape {tuple(t['W_enc'].shape)}")
    saved_in, d_sae = t["W_enc"].shape
    expected = {"W_dec": (d_sae, saved_in), "b_enc": (d_sae,), "b_dec": (saved_in,)}
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape:
            raise SAEFileError(f"{folder / WEIGHTS}: {name} has shape {tuple(t[name].shape)}, expected {shape} "
                               f"(W_enc is (d_in={saved_in}, d_sae={d_sae}))")
    for key, value in (("d_in", saved_in), ("d_sae", d_sae)):
        if key in cfg and cfg[key] != value:
            raise SAEFileError(f"{folder / CONFIG} says {key}={cfg[key]!r} but the tensors in {WEIGHTS} have "
                               f"{key}={value}")
    bad = [n for n, v in t.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SAEFileError(f"{folder / WEIGHTS}: tensors {sorted(bad)} hold NaN/inf values")
    if d_in is not None and d_in != saved_in:
        raise ValueError(f"d_in mismatch: the SAE in {folder} was trained on d_in={saved_in}, the data has d_in={d_in}")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if k is None:
        raise SAEFileError(f"{folder / CONFIG} names no k (neither 'k' nor 'activation_fn_kwargs.k')")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_sae:
        raise SAEFileError(f"{folder / CONFIG}: k={k!r} must be an integer in [1, d_sae={d_sae}]")
    arch = cfg.get("architecture", "topk")
    if arch not in ARCHITECTURES and cfg.get("activation_fn_str") == "topk":  # SAELens "standard" + topk activation
        arch = "topk"
    try:
        model = SparseAutoencoder(saved_in, d_sae, int(k), architecture=arch,
                                  matryoshka=cfg.get("matryoshka_prefixes") or (),
                                  k_aux=cfg.get("k_aux"), aux_coef=cfg.get("aux_coef", 1 / 32),
                                  dead_after=cfg.get("dead_after", 10_000_000))
    except (TypeError, ValueError) as e:  # architecture, matryoshka prefixes, k_aux ... that do not fit
        raise SAEFileError(f"{folder / CONFIG}: {e}") from e
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
