"""The SAE's config, ``SAEConfig``: one dataclass that is ``revelio sae fit``'s ``model.*`` section, the
hyper-parameters of ``sae.lightning.SAEModule``, what ``sae.model.SparseAutoencoder.from_config`` builds, and
``cfg.json`` of every SAE folder (EleutherAI sparsify's pattern: the config is written next to the weights and
read back from them).

``cfg.json`` also follows SAELens 6's layout, so two fields are written under other names: ``architecture``
as ``revelio_architecture`` (SAELens's ``architecture`` says how SAELens should run the weights, "topk" or
"jumprelu"; ``sae.io`` writes it) and ``matryoshka`` as ``matryoshka_prefixes``. A folder records the
*resolved* config (``resolved(d_in)``: ``d_sae``, ``k_aux`` and the Matryoshka prefixes made concrete), so
``SAEConfig.from_cfg_json(cfg)`` gives back what the SAE was built with. Keys a folder lacks (folders of
older Revelio versions, or written by SAELens) keep their defaults here; ``sae.io.load`` takes the
architecture and k of such folders from SAELens's places.

Light on purpose (no torch): ``revelio sae fit --help`` imports it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from extraction.config import field

Architecture = Literal["topk", "batchtopk"]
EncoderInit = Literal["lstsq", "unit", "sparsify"]
TimestepConditioning = Literal["none", "scale_bias"]
BDecInit = Literal["mean", "geometric_median", "zeros"]
ARCHITECTURES = typing.get_args(Architecture)
ENCODER_INITS = typing.get_args(EncoderInit)
TIMESTEP_CONDITIONINGS = typing.get_args(TimestepConditioning)
B_DEC_INITS = typing.get_args(BDecInit)

# cfg.json's name of a field, where it is not the field's own name (SAELens owns "architecture")
CFG_JSON_NAMES = {"architecture": "revelio_architecture", "matryoshka": "matryoshka_prefixes"}


@dataclass
class SAEConfig:
    """The SAE: its architecture (the first keys, up to ``encoder_init``) and how ``SAEModule`` initialises and
    trains it (the rest). See ``sae.model.SparseAutoencoder`` and ``sae.lightning.SAEModule``."""

    expansion: int = field(16, min=1, help="d_sae = expansion * d_in (when d_sae is null)")
    d_sae: int | None = field(None, min=1, help="dictionary size; overrides expansion")
    k: int = field(32, min=1, help="active latents per sample")
    architecture: Architecture = field("topk", help="topk | batchtopk")
    matryoshka: list[int] = field(default_factory=list, min=1, help="Matryoshka prefix sizes, e.g. [512, 2048]; [] = off")
    k_aux: int | None = field(None, min=1, help="AuxK latents (null: d_in // 2)")
    aux_coef: float = field(1 / 32, min=0, help="AuxK loss weight")
    dead_after: int = field(10_000_000, min=1, help="samples without firing after which a latent is dead")
    b_dec_init: BDecInit = field("geometric_median", help="b_dec init from a data sample")
    normalize: bool = field(True, help="scale inputs so that mean ||x|| = sqrt(d_in) (constant saved with the SAE)")
    encoder_init: EncoderInit = field(
        "lstsq", help="encoder start: tied rows of the least-squares length (lstsq), of unit norm (unit), or "
                      "EleutherAI sparsify's nn.Linear init (sparsify)")
    init_samples: int = field(16384, min=1, help="samples used for b_dec, the normalisation constant, the lstsq encoder "
                                          "scale and the BatchTopK threshold calibration (held-out samples)")
    lr: float | None = field(None, above=0, help="Adam lr (null: 2e-4 / sqrt(d_sae / 2^14))")
    warmup_steps: int = field(100, min=0, help="linear lr warm-up steps")
    decay_fraction: float = field(0.0, min=0, max=1, help="linear lr decay to 0 over this last share of max_steps")
    hist_every: int = field(500, min=0, help="M: density and decoder-norm histograms every M steps (0: never)")
    timestep_conditioning: TimestepConditioning = field(
        "none", help="with several data.timesteps: none (one pooled SAE) or scale_bias (a learned per-timestep "
                     "scale and bias of each latent's pre-activation, starting at the identity)")

    def resolved(self, d_in: int) -> SAEConfig:
        """This config for inputs of width ``d_in``, with ``d_sae`` (expansion * d_in when null), ``k_aux``
        (d_in // 2 when null) and the Matryoshka prefixes (sorted, ``d_sae`` added) made concrete; ``expansion``
        is restated as d_sae / d_in when that is whole (``d_sae`` decides)."""
        d_sae = int(self.d_sae or self.expansion * d_in)
        prefixes = sorted({int(m) for m in self.matryoshka} | {d_sae}) if self.matryoshka else [d_sae]
        return dataclasses.replace(
            self, d_sae=d_sae, expansion=d_sae // d_in if d_sae % d_in == 0 else self.expansion,
            k_aux=int(self.k_aux) if self.k_aux is not None else max(1, d_in // 2), matryoshka=prefixes)

    def to_cfg_json(self) -> dict[str, Any]:
        """The keys of ``cfg.json`` this config writes (under their ``CFG_JSON_NAMES``); give it resolved."""
        return {CFG_JSON_NAMES.get(f.name, f.name): _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_cfg_json(cls, cfg: dict[str, Any]) -> SAEConfig:
        """The config a ``cfg.json`` records: its keys of this class (other keys are ignored); a key it lacks,
        or holds as null where the field takes no null, keeps the default."""
        kw = {}
        for f in dataclasses.fields(cls):
            name = CFG_JSON_NAMES.get(f.name, f.name)
            if name not in cfg:
                continue
            value = cfg[name]
            if value is None and _default(f) is not None:
                continue
            kw[f.name] = list(value) if isinstance(value, tuple) else value
        return cls(**kw)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


__all__ = ["ARCHITECTURES", "B_DEC_INITS", "CFG_JSON_NAMES", "ENCODER_INITS", "SAEConfig", "TIMESTEP_CONDITIONINGS"]
