"""The extraction stage's config: ``ExtractionPlan``, what to extract, with one default per key.

It is the config of ``revelio extract`` (``revelio.extraction_config.ExtractConfig`` is this class with its
``model`` and ``data`` sections typed as what the CLI loads) and what ``extraction.run.Extractor`` runs.
The plan computes its own identity (``identity()``: the keys that define the stored arrays, checked before
a run appends to an existing store) and provenance (``provenance()``), so a Python caller of ``Extractor``
is protected against resuming a store written with another config just as the CLI is.

Light on purpose: no torch, no h5py (``revelio extract --help`` imports it). ``field`` is the dataclass field
with a help string and bounds that every stage's config uses; ``revelio.config`` reads that metadata (it
checks the bounds when a config is loaded and prints the help in ``--help``).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

# Keys that do not change the stored data: changing them lets a run resume the same file. ``model.device``
# (where the pipeline runs) neither.
NON_IDENTITY = ("batch_size", "out", "progress")
NON_IDENTITY_MODEL = ("device",)
PACKAGE = "revelio-diffusion"  # the distribution whose version the store records


def field(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING,
          min: float | None = None, max: float | None = None, above: float | None = None, below: float | None = None,
          nonempty: bool = False):
    """A dataclass field with a help string shown by ``revelio <cmd> --help``.

    ``min``/``max`` (inclusive) and ``above``/``below`` (exclusive) bound a number, or every element of a
    list; ``nonempty`` refuses an empty list. A value outside is a ConfigError naming the key, raised by
    ``revelio.config`` when the config is loaded (before any model or data set is touched). None (where the
    type allows it) is never checked.
    """
    bounds = {k: v for k, v in (("min", min), ("max", max), ("above", above), ("below", below)) if v is not None}
    kw: dict[str, Any] = {"metadata": {"help": help, "bounds": bounds, "nonempty": nonempty}}
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    else:
        kw["default"] = default
    return dataclasses.field(**kw)


def plain(obj: Any) -> Any:
    """``obj`` as plain YAML/JSON-able data (dataclasses -> dicts, tuples -> lists, paths -> str)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


Capture = Literal["output", "input", "delta"]
Pooling = Literal["none", "mean"]
PromptMode = Literal["empty", "caption", "template"]
StorageDtype = Literal["float16", "float32"]
Compression = Literal["none", "gzip", "lzf"]
CAPTURES, POOLINGS, PROMPT_MODES = typing.get_args(Capture), typing.get_args(Pooling), typing.get_args(PromptMode)
STORAGE_DTYPES, COMPRESSIONS = typing.get_args(StorageDtype), typing.get_args(Compression)


@dataclasses.dataclass
class ExtractionPlan:
    """What to extract, and where to: ``revelio extract``'s config and ``Extractor``'s plan.

    ``model`` and ``data`` describe the pipeline and the images; the stage does not load either (it is
    handed a pipeline and a data set) but records both in the store's identity and provenance. The CLI
    gives its model and data-set sections (``revelio.extraction_config``); a Python caller may give a mapping
    (``data={"name": "mine", "size": 64}``) or leave them None. Images are fed at ``data.size`` pixels
    (resize the short side, centre crop); without one, at their own size (the short side, centre-cropped).
    """

    model: Any = field(None, help="the pipeline (revelio extract: its model section)")
    data: Any = field(None, help="the images (revelio extract: its data-set section; data.size is the side fed in)")
    hooks: list[str] = field(default_factory=lambda: ["mid_block", "up_blocks.1"],
                             nonempty=True, help="denoiser module names to hook (e.g. mid_block, up_blocks.1, transformer_blocks.3)")
    timesteps: list[int] = field(default_factory=lambda: [25], nonempty=True, min=0, max=999, help="noise timesteps in [0, 1000), one forward each")
    capture: Capture = field("output", help="output | input | delta (output - input)")
    pooling: Pooling = field("none", help="none (keep maps / image tokens) | mean (spatial mean, layout NC)")
    prompt: PromptMode = field("empty", help="empty | caption | template")
    template: str = field("a photo of a {label}", help="prompt for prompt=template; {label} name, {label_id} int")
    batch_size: int = field(16, min=1, help="images per denoiser call")
    storage_dtype: StorageDtype = field("float16", help="float16 | float32 on disk")
    compression: Compression = field("none", help="none | gzip | lzf (chunk compression; none is fastest and crash-safest)")
    seed: int = field(0, help="noise seed; noise depends on (seed, image id, timestep) only")
    out: str = field("runs/activations.h5", help="output HDF5 store (resumed when it exists with the same config)")
    progress: bool = field(True, help="show a progress bar")

    @property
    def size(self) -> int | None:
        """The side (pixels) images are fed at: ``data.size`` (a dataclass or a mapping); None: their own."""
        d = self.data
        size = d.get("size") if isinstance(d, dict) else getattr(d, "size", None)
        return None if size is None else int(size)

    def identity(self) -> dict[str, Any]:
        """The config keys that define the stored arrays: every key but ``NON_IDENTITY`` (and ``model.device``).

        A run refuses to append to a store whose identity differs (``Extractor``); the store keeps it as JSON.
        """
        full = plain(self)
        out = {k: v for k, v in full.items() if k not in NON_IDENTITY}
        if isinstance(out.get("model"), dict):
            out["model"] = {k: v for k, v in out["model"].items() if k not in NON_IDENTITY_MODEL}
        return out

    def provenance(self) -> dict[str, Any]:
        """What the store records about its making: model and data-set names, the full config, the package version."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            pkg_version = version(PACKAGE)
        except PackageNotFoundError:
            pkg_version = "unknown"

        def name(section: Any, key: str) -> str:
            v = section.get(key) if isinstance(section, dict) else getattr(section, key, None)
            return "" if v is None else str(v)

        return {"model": name(self.model, "id"), "dataset": name(self.data, "name"), "config": plain(self),
                "package_version": pkg_version}

    def validate(self) -> None:
        """Refuse a plan that cannot run (Python callers get the checks the CLI makes when it loads a config)."""
        for key, allowed in (("capture", CAPTURES), ("pooling", POOLINGS), ("prompt", PROMPT_MODES),
                             ("storage_dtype", STORAGE_DTYPES), ("compression", COMPRESSIONS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if not self.timesteps:
            raise ValueError("timesteps is empty; give a list like [25, 250]")
        bad = [t for t in self.timesteps if not 0 <= int(t) < 1000]
        if bad:
            raise ValueError(f"timesteps {bad} are outside [0, 1000)")
        if len(set(self.timesteps)) != len(self.timesteps) or len(set(self.hooks)) != len(self.hooks):
            raise ValueError("hooks and timesteps must not repeat")
        if self.batch_size < 1 or (self.size is not None and self.size < 8):
            raise ValueError("batch_size must be >= 1 and data.size >= 8")


__all__ = ["COMPRESSIONS", "ExtractionPlan", "NON_IDENTITY", "PROMPT_MODES", "STORAGE_DTYPES", "field", "plain"]
