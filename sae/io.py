"""The SAE folder, in the layout SAELens 6 writes: ``sae_weights.safetensors`` + ``cfg.json``.

``SAE.load_from_disk(folder)`` of SAELens 6 loads it as a ``topk`` SAE (a BatchTopK SAE with its
learned threshold as a ``jumprelu`` SAE, as SAELens itself exports BatchTopK), with the hook under
``metadata.hook_name``; ``load`` reads such folders written by SAELens too, and folders of older
Revelio versions (``sae.safetensors``).

Saved weights act on RAW activations: the input normalisation x_n = s x is folded in
(W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b_dec / s), so any SAELens-style reader gets
the same codes and a reconstruction in raw units. ``cfg.json`` keeps s (``norm_scale``) and
``load`` unfolds it again, restoring the unit-norm decoder of training.

``cfg.json`` also records the SAE's config (``sae.config.SAEConfig``, resolved; ``architecture`` as
``revelio_architecture``, since SAELens owns ``architecture``); ``load`` reads it back into ``model.config``.

An SAE over several timesteps records them (``timesteps`` in cfg.json; ``timestep`` is the first).
A timestep-aware one (``timestep_conditioning: scale_bias``) also holds ``t_scale`` and ``t_bias``
[T, d_sae] in the safetensors: it is not a SAELens SAE. The base tensors are still written in
SAELens's layout, but on their own they are the SAE without its per-timestep modulation (cfg.json
says so: ``saelens_compatible: false``; SAELens 6's ``load_from_disk`` refuses the folder, naming the
unexpected tensors); ``load`` applies the modulation.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from extraction.files import OutputError, atomic_path, fix_mode, write_failed
from safetensors.torch import load_file, save_file

from .config import ARCHITECTURES, SAEConfig
from .model import SparseAutoencoder

WEIGHTS = "sae_weights.safetensors"  # SAELens 6's file name
LEGACY_WEIGHTS = "sae.safetensors"  # Revelio before format_version 2
CONFIG = "cfg.json"
FORMAT_VERSION = 2
SAELENS_FORMAT = "6.0.0"  # the SAELens config layout the folder follows (metadata.sae_lens_version)


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
    """Write ``model`` to ``folder`` atomically (a temp folder renamed into place); ``extra`` goes into cfg.json.

    ``extra["hook"]`` (and ``model`` / ``timestep``) are mirrored into ``metadata`` as SAELens reads them.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    s = float(model.norm_scale)
    tensors = {
        "W_enc": (model.W_enc.detach() * s).float().cpu().contiguous(),
        "W_dec": (model.W_dec.detach() / s).float().cpu().contiguous(),
        "b_enc": model.b_enc.detach().float().cpu().contiguous(),
        "b_dec": (model.b_dec.detach() / s).float().cpu().contiguous(),
    }
    if model.conditioned:  # the folding leaves the pre-activations, and so their modulation, unchanged
        tensors["t_scale"] = model.t_scale.detach().float().cpu().contiguous()
        tensors["t_bias"] = model.t_bias.detach().float().cpu().contiguous()
    thr = float(model.threshold)
    # SAELens architecture: per-sample TopK is "topk"; BatchTopK at inference (a global threshold on the
    # pre-activations, unchanged by the folding) is SAELens's "jumprelu" with that threshold on every latent.
    # A BatchTopK SAE without a learned threshold yet still encodes with batch top-k; SAELens gets "topk".
    if model.architecture == "batchtopk" and thr >= 0:
        tensors["threshold"] = torch.full((model.d_sae,), thr)
        saelens: dict[str, Any] = {"architecture": "jumprelu"}
    else:
        saelens = {"architecture": "topk", "k": model.k, "rescale_acts_by_decoder_norm": False}
    extra = dict(extra or {})
    metadata = {**(extra.pop("metadata", None) or {}),
                **{k: v for k, v in {"sae_lens_version": SAELENS_FORMAT, "hook_name": extra.get("hook"),
                                     "model_name": extra.get("model"), "timestep": extra.get("timestep"),
                                     "dataset_path": extra.get("dataset"), "trained_with": "revelio"}.items()
                   if v is not None}}
    for stale in ("architecture", "k", "rescale_acts_by_decoder_norm", "activation_fn_str", "activation_fn_kwargs",
                  "hook_name", "timesteps", "saelens_compatible", "saelens_note"):
        extra.pop(stale, None)  # a loaded folder's cfg passed back in: the model decides these
    cfg = {
        **extra,  # what the caller records (hook, timestep, source store, ...); the keys below describe the weights
        # SAELens 6 keys (SAELens ignores the keys its config class lacks)
        "d_in": model.d_in, "d_sae": model.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # weights already act on raw activations (s folded in)
        "reshape_activations": "none",
        "metadata": metadata,
        **saelens,
        # Revelio's own: the SAE's config (sae.config.SAEConfig, resolved; read back by SAEConfig.from_cfg_json)
        "format_version": FORMAT_VERSION,
        **model.config.to_cfg_json(),
        "norm_scale": s, "norm_folded": True,
        "threshold": thr,
    }
    if model.timesteps:
        cfg["timesteps"] = list(model.timesteps)
        cfg.setdefault("timestep", model.timesteps[0])
    if model.conditioned:
        cfg["saelens_compatible"] = False
        cfg["saelens_note"] = ("timestep-aware SAE: the pre-activations of timestep index i are pre * t_scale[i] + "
                               "t_bias[i] (tensors t_scale, t_bias [T, d_sae] in the safetensors, timesteps in "
                               "'timesteps'); SAELens applies none of it (its load_from_disk refuses the extra "
                               "tensors) and the base tensors alone are not this SAE. Load it with sae.load.")
    made = False  # an error creating the temporary folder is passed on as it is
    try:
        with atomic_path(folder, folder=True) as tmp:  # swapped in whole; the old folder goes after
            made = True
            save_file(tensors, str(tmp / WEIGHTS))
            fix_mode(tmp / WEIGHTS)  # safetensors creates it 0600 whatever the umask
            (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
    except Exception as e:
        if made and not isinstance(e, (OutputError, ValueError, TypeError)):
            raise write_failed(e, "writing", folder / WEIGHTS) from e  # a full disk, an I/O error: name the file
        raise
    return folder


def weights_file(folder: str | Path) -> Path:
    """The weights file of an SAE folder: SAELens's ``sae_weights.safetensors`` or Revelio's older ``sae.safetensors``."""
    folder = Path(folder)
    for name in (WEIGHTS, LEGACY_WEIGHTS):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder} is not an SAE folder: it needs {CONFIG} and {WEIGHTS} (or {LEGACY_WEIGHTS})")


def read_config(folder: str | Path) -> dict[str, Any]:
    """cfg.json of an SAE folder with ``hook`` / ``timestep`` / ``model`` filled from SAELens's places.

    SAELens 6 keeps the hook under ``metadata.hook_name`` (older SAELens: ``hook_name`` / ``hook_point``).
    """
    cfg = read_cfg(folder)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for ours, theirs in (("hook", ("hook_name", "hook_point")), ("model", ("model_name",)), ("timestep", ("timestep",))):
        if cfg.get(ours) is None:
            for key in theirs:
                v = meta.get(key, cfg.get(key))
                if v is not None:
                    cfg[ours] = v
                    break
    if cfg.get("hook") is not None:
        cfg.setdefault("hook_name", cfg["hook"])
    return cfg


def _architecture(cfg: dict[str, Any], t: dict[str, torch.Tensor], where: Path) -> tuple[str, int, float]:
    """(Revelio architecture, k, threshold) of a folder's cfg: ours, or SAELens's topk / jumprelu / standard+topk."""
    if cfg.get("revelio_architecture") in ARCHITECTURES:
        arch = cfg["revelio_architecture"]
    else:
        arch = cfg.get("architecture", "topk")
    act = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    threshold = float(cfg.get("threshold", -1.0)) if not isinstance(cfg.get("threshold"), (list, dict)) else -1.0
    if arch == "standard" and act == "topk":  # SAELens before 6: "standard" + a topk activation
        arch = "topk"
    if arch == "jumprelu" and "revelio_architecture" not in cfg:
        th = t.get("threshold")
        if th is None:
            raise ValueError(f"{where} is a jumprelu SAE without a 'threshold' tensor")
        if not torch.allclose(th, th.flatten()[0].expand_as(th)):
            raise ValueError(f"{where} is a jumprelu SAE with per-latent thresholds; Revelio loads only one threshold "
                             "for all latents (a BatchTopK SAE exported by SAELens or Revelio)")
        arch, threshold = "batchtopk", float(th.flatten()[0])
        k = k or max(1, int(cfg.get("d_sae", t["W_enc"].shape[1])) // 32)  # k only matters for re-training
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where} has architecture {arch!r}; Revelio loads {list(ARCHITECTURES)}, SAELens's "
                         "'jumprelu' with one threshold and 'standard' with a topk activation")
    if k is None:
        raise ValueError(f"{where} names no k (neither 'k' nor 'activation_fn_kwargs.k')")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise ValueError(f"{where} has rescale_acts_by_decoder_norm=true, which Revelio's TopK does not apply")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"{where} has normalize_activations={cfg['normalize_activations']!r}; Revelio loads only "
                         "'none' (fold the scaling into the weights first)")
    return arch, int(k), threshold


def load(folder: str | Path, device: str | torch.device = "cpu", d_in: int | None = None) -> SparseAutoencoder:
    """Load an SAE folder (ours, an older Revelio one, or SAELens's TopK / BatchTopK): a module with
    ``encode``, ``decode``, ``forward`` and ``cfg`` (``cfg["hook"]`` also from SAELens's ``metadata.hook_name``).

    ``d_in``, when given, must match the saved width (fails clearly otherwise).
    """
    folder = Path(folder)
    wfile = weights_file(folder)
    cfg = read_config(folder)
    try:
        t = load_file(str(wfile))
    except (SafetensorError, OSError, RuntimeError) as e:  # truncated, random bytes, bad header
        raise SAEFileError(f"{wfile} is not a readable safetensors file ({e})") from e
    missing = [n for n in ("W_enc", "W_dec", "b_enc", "b_dec") if n not in t]
    if missing:
        raise SAEFileError(f"{wfile} lacks tensors {missing}; found {sorted(t)}")
    if t["W_enc"].ndim != 2:
        raise SAEFileError(f"{wfile}: W_enc must be 2-D (d_in, d_sae), got shape {tuple(t['W_enc'].shape)}")
    t = {n: v.float() if v.is_floating_point() else v for n, v in t.items()}
    saved_in, d_sae = t["W_enc"].shape
    expected = {"W_dec": (d_sae, saved_in), "b_enc": (d_sae,), "b_dec": (saved_in,)}
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape:
            raise SAEFileError(f"{wfile}: {name} has shape {tuple(t[name].shape)}, expected {shape} "
                               f"(W_enc is (d_in={saved_in}, d_sae={d_sae}))")
    for key, value in (("d_in", saved_in), ("d_sae", d_sae)):
        if key in cfg and cfg[key] != value:
            raise SAEFileError(f"{folder / CONFIG} says {key}={cfg[key]!r} but the tensors in {wfile.name} have "
                               f"{key}={value}")
    bad = [n for n, v in t.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SAEFileError(f"{wfile}: tensors {sorted(bad)} hold NaN/inf values")
    if d_in is not None and d_in != saved_in:
        raise ValueError(f"d_in mismatch: the SAE in {folder} was trained on d_in={saved_in}, the data has d_in={d_in}")
    try:
        arch, k, threshold = _architecture(cfg, t, folder / CONFIG)
    except SAEFileError:
        raise
    except ValueError as e:
        raise SAEFileError(str(e)) from e
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_sae:
        raise SAEFileError(f"{folder / CONFIG}: k={k!r} must be an integer in [1, d_sae={d_sae}]")
    b_enc = t["b_enc"]
    if not cfg.get("apply_b_dec_to_input", True):  # x W + b_enc == (x - b_dec) W + (b_enc + b_dec W)
        b_enc = b_enc + t["b_dec"] @ t["W_enc"]
    timesteps = cfg.get("timesteps") or []
    cond = cfg.get("timestep_conditioning", "none")
    if not isinstance(timesteps, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in timesteps):
        raise SAEFileError(f"{folder / CONFIG}: timesteps={timesteps!r} must be a list of integers")
    if cond != "none":
        for name in ("t_scale", "t_bias"):
            if name not in t:
                raise SAEFileError(f"{wfile} lacks tensor {name!r}, which timestep_conditioning={cond!r} in {CONFIG} "
                                   "needs")
            if tuple(t[name].shape) != (len(timesteps), d_sae):
                raise SAEFileError(f"{wfile}: {name} has shape {tuple(t[name].shape)}, expected "
                                   f"{(len(timesteps), d_sae)} ({len(timesteps)} timesteps x d_sae)")
    try:  # the config cfg.json records (keys older or SAELens folders lack: defaults), with the weights' facts
        config = SAEConfig.from_cfg_json(cfg)
        config = replace(config, d_sae=d_sae, k=k, architecture=arch, timestep_conditioning=cond)
        model = SparseAutoencoder.from_config(saved_in, config, timesteps=timesteps)
    except (TypeError, ValueError) as e:  # architecture, matryoshka prefixes, k_aux ... that do not fit
        raise SAEFileError(f"{folder / CONFIG}: {e}") from e
    s = float(cfg.get("norm_scale", 1.0)) if cfg.get("norm_folded", False) else 1.0
    with torch.no_grad():
        model.W_enc.copy_(t["W_enc"] / s)
        model.W_dec.copy_(t["W_dec"] * s)
        model.b_enc.copy_(b_enc)
        model.b_dec.copy_(t["b_dec"] * s)
        model.norm_scale.fill_(s)
        model.threshold.fill_(threshold)
        if model.conditioned:
            model.t_scale.copy_(t["t_scale"])
            model.t_bias.copy_(t["t_bias"])
    model.cfg = cfg
    return model.to(device).eval()
