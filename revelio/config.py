"""Typed configs: YAML files plus dotted command-line overrides, checked against dataclasses.

Every subcommand declares its config as a (nested) dataclass. A YAML file fills it,
``--section.key value`` overrides any field, and an unknown key fails with the list of
valid ones. The resolved config is a plain dict again (``to_dict``) so it can be stored
as provenance next to results.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from extraction.config import field, plain

T = TypeVar("T")

# ``field`` (a dataclass field with help text and bounds) and ``plain`` live in the extraction stage, whose configs
# (``extraction.config``, ``sae.config``) use them without importing ``revelio``; the metadata is read here.
to_dict = plain  # the config as plain YAML-able data (dataclasses -> dicts, tuples -> lists, paths -> str)


class RevelioError(Exception):
    """Base of errors about the user's input (printed without a traceback by the CLI)."""


class ConfigError(RevelioError, ValueError):
    """A config that does not fit its schema; the message says what to pass instead."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` (dataclasses recursively)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {tp}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}{did_you_mean(value, list(args))}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as e:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from e
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from e
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def did_you_mean(name: str, valid: list[str]) -> str:
    """' (did you mean 'x'?)' for the valid name closest to ``name`` (difflib), or ''."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys fail and name the valid ones."""
    hints = _resolved_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(f"unknown key(s) {', '.join(repr(f'{prefix}.{k}' if prefix else k) for k in unknown)}{where}"
                          f"{did_you_mean(unknown[0], names)}; valid keys: {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            base = _default(f)
            if isinstance(value, dict) and dataclasses.is_dataclass(base):
                # a partial section keeps the field's own defaults (e.g. default_factory=lambda: Model(id="tiny-flux"))
                value = deep_merge(to_dict(base), value)
            where = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(value, hints[f.name], where)
            check_range(kwargs[f.name], f, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{prefix + '.' if prefix else ''}{f.name}'")
    return cls(**kwargs)


_BOUND_TEXT = {"min": ">=", "max": "<=", "above": ">", "below": "<"}


def _outside(v: Any, bounds: dict[str, float]) -> str | None:
    """The first bound ``v`` breaks, as text (">= 1"), or None."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    ok = {"min": lambda b: v >= b, "max": lambda b: v <= b, "above": lambda b: v > b, "below": lambda b: v < b}
    if v != v:  # NaN fits no range
        return " and ".join(f"{_BOUND_TEXT[k]} {b:g}" for k, b in bounds.items()) or None
    for k, b in bounds.items():
        if not ok[k](b):
            return " and ".join(f"{_BOUND_TEXT[k2]} {b2:g}" for k2, b2 in bounds.items())
    return None


def check_range(value: Any, f: dataclasses.Field, where: str) -> None:
    """Refuse ``value`` of field ``f`` when it breaks the field's ``min``/``max``/``above``/``below``/``nonempty``."""
    meta = f.metadata or {}
    bounds, nonempty = meta.get("bounds") or {}, meta.get("nonempty", False)
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        if nonempty and len(value) == 0:
            raise ConfigError(f"{where}: the list is empty; give at least one value")
        for i, v in enumerate(value):
            rule = _outside(v, bounds)
            if rule:
                raise ConfigError(f"{where}[{i}]: {v!r} is out of range; each value must be {rule}")
        return
    rule = _outside(value, bounds)
    if rule:
        raise ConfigError(f"{where}: {value!r} is out of range; it must be {rule}")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``['--model.id', 'tiny-sd', '--timesteps=[10,50]']`` into a nested dict.

    Values are parsed as YAML, so numbers, booleans and lists work as in the files.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"expected an override like --section.key VALUE, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and len(args[i + 1]) > 2 and not _is_number(args[i + 1])):
                raise ConfigError(f"override --{key} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        parsed = yaml.safe_load(value) if value != "" else ""
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with an earlier value for {p!r}")
        node[parts[-1]] = parsed
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# The shipped configs (package data; in a clone ``revelio/configs`` is a link to the top-level ``configs/``).
SHIPPED = Path(__file__).resolve().parent / "configs"


def shipped_configs(section: str | None = None) -> list[str]:
    """Names of the shipped configs, ``section/name`` (all sections) or ``name`` (one section)."""
    if section is not None:
        return sorted(p.stem for p in (SHIPPED / section).glob("*.yaml"))
    return sorted(f"{p.parent.name}/{p.stem}" for p in SHIPPED.glob("*/*.yaml"))


def find_config(path: str | Path, section: str | None = None) -> Path:
    """A config file from a path, or a shipped config: ``tiny-sd`` (in the command's ``section``),
    ``extract/tiny-sd``, or ``configs/extract/tiny-sd.yaml`` from any folder."""
    p = Path(path)
    if p.exists():
        return p
    name = str(path).removesuffix(".yaml").removesuffix(".yml")
    name = name.removeprefix("configs/").removeprefix("revelio/configs/")
    candidates = [SHIPPED / f"{name}.yaml"] + ([SHIPPED / section / f"{name}.yaml"] if section else [])
    if section is None and "/" not in name:
        candidates += sorted(SHIPPED.glob(f"*/{name}.yaml"))
    found = [c for c in dict.fromkeys(candidates) if c.is_file()]
    in_section = [c for c in found if c.parent.name == section]
    if in_section or len(found) == 1:
        return (in_section or found)[0]
    if len(found) > 1:
        raise ConfigError(f"config {str(path)!r} names several shipped configs: "
                          + ", ".join(f"{c.parent.name}/{c.stem}" for c in found))
    names = shipped_configs(section) if section else shipped_configs()
    raise ConfigError(f"config file {str(path)!r} does not exist and is no shipped config; shipped"
                      + (f" for this command ({section}/)" if section else "") + ": " + ", ".join(names))


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
         section: str | None = None) -> T:
    """Load ``cls`` from an optional YAML file (a path or a shipped name, see ``find_config``) and dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = find_config(path, section)
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        data = loaded
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = deep_merge(data, over)
    return from_dict(cls, data)


def _default(f: dataclasses.Field) -> Any:
    """The default value of field ``f`` (a fresh one for a default_factory); MISSING when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def literal_choices(tp: Any) -> list[Any]:
    """The values a ``Literal`` type (or the Literals of a union) allows; [] for other types."""
    if typing.get_origin(tp) is typing.Literal:
        return list(typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [c for arg in typing.get_args(tp) for c in literal_choices(arg)]
    return []


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """Rows (dotted key, default, help) for every leaf field, for ``--help``.

    ``defaults`` is the instance whose values are shown (a nested section's own default, which
    may differ from its class defaults); None: the fields' defaults.
    """
    rows = []
    hints = _resolved_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, key + ".", default if dataclasses.is_dataclass(default) else None))
            continue
        text = f.metadata.get("help", "")
        choices = list(dict.fromkeys(str(c) for c in literal_choices(tp)))  # 32 and "32" show once
        if choices and not all(c in text for c in choices):
            text = f"{text} [{' | '.join(choices)}]".strip()
        if default is dataclasses.MISSING:
            shown = "(required)"
        else:
            shown = yaml.safe_dump(to_dict(default), default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((key, shown, text))
    return rows
