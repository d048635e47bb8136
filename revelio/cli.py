"""The ``revelio`` command: one entry point, one subcommand per stage.

A subcommand is declared once with ``@command(name, Config)``: its config is a dataclass,
filled from ``--config file.yaml`` and dotted overrides (``--model.id tiny-sd``), and its
``--help`` lists every key with its default and meaning. Subcommands that own their own
argument parser (Lightning's CLI for ``sae fit``) are declared with ``raw=True`` and get
the remaining argv.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import config as C

# Modules that declare subcommands; imported lazily so `revelio --help` stays fast.
COMMAND_MODULES = [
    "revelio.commands.zoo_data",
    "revelio.commands.zoo_train",
    "revelio.commands.extract",
    "revelio.commands.sae",
    "revelio.commands.probe",
    "revelio.commands.saliency_segment",
    "revelio.commands.compare_browse_steer",
    "revelio.commands.erase",
    "revelio.commands.demo",
]


@dataclass
class Command:
    name: str
    help: str
    func: Callable[..., Any]
    config: type | None = None
    raw: bool = False


COMMANDS: dict[str, Command] = {}

# Errors that mean "the input or the environment is wrong": printed as one line, exit status 2.
# OSError covers the operating system's answers (read-only or full disk, permissions, a file that
# vanished, a failed download: requests' and huggingface_hub's errors are OSErrors); FloatingPointError
# is training on NaN/inf data. Anything else (TypeError, AttributeError, RuntimeError, ...) is a bug
# and keeps its traceback.
USER_ERRORS = (C.RevelioError, OSError, ValueError, KeyError, FloatingPointError)


def user_message(e: BaseException) -> str:
    """The one line printed for a user error: its message, an OSError's cause and file named."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    files = sys.modules.get("extraction.files")
    if files is not None and isinstance(e, files.OutputError):  # another writer holds the output, a full disk: its own line
        return " ".join(str(e).split("\n")).strip()
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        files = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{e.strerror.lower()}: {files}"
    return " ".join(str(e).split("\n")).strip() or type(e).__name__


def command(name: str, config: type | None = None, raw: bool = False):
    """Register ``func(cfg)`` (or ``func(argv)`` when ``raw``) as ``revelio <name>``; help is its docstring."""

    def wrap(func):
        COMMANDS[name] = Command(name=name, help=(func.__doc__ or "").strip(), func=func, config=config, raw=raw)
        return func

    return wrap


# Which folder of the shipped configs (revelio/configs, a link to configs/) a command's ``--config NAME`` reads.
_SECTIONS = {"extract": "extract", "sae fit": "sae", "probe": "probes", "probe report": "probes",
             "saliency": "saliency", "segment": "segment", "compare": "analysis", "browse": "analysis",
             "steer": "analysis", "zoo train": "zoo"}


def config_section(name: str) -> str | None:
    """The shipped-config folder of command ``name`` (``revelio extract --config tiny-sd`` -> extract/tiny-sd.yaml)."""
    return _SECTIONS.get(name)


def _load_commands() -> None:
    for mod in COMMAND_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real missing dependency inside the module, not a stage not built yet
                raise


def _usage() -> str:
    lines = ["usage: revelio <command> [--config FILE.yaml] [--section.key VALUE ...] [--print_config]", "", "commands:"]
    width = max(len(n) for n in COMMANDS) if COMMANDS else 8
    for name in sorted(COMMANDS):
        lines.append(f"  {name:<{width}}  {COMMANDS[name].help.splitlines()[0] if COMMANDS[name].help else ''}")
    lines += ["", "`revelio <command> --help` lists the command's config keys."]
    return "\n".join(lines)


def command_help(cmd: Command) -> str:
    lines = [f"usage: revelio {cmd.name} [--config FILE.yaml] [--section.key VALUE ...] [--print_config]", "", cmd.help, ""]
    shipped = C.shipped_configs(config_section(cmd.name)) if cmd.config is not None else []
    if shipped:
        lines += [f"shipped configs (--config NAME, from any folder): {', '.join(shipped)}", ""]
    if cmd.config is not None:
        rows = C.describe(cmd.config)
        kw = max(len(r[0]) for r in rows)
        dw = min(28, max(len(r[1]) for r in rows))
        lines.append("config keys (YAML file and/or --key VALUE overrides):")
        for key, default, text in rows:
            lines.append(f"  --{key:<{kw}}  {default:<{dw}}  {text}")
    return "\n".join(lines)


def split_command(argv: list[str]) -> tuple[Command | None, list[str]]:
    """Find the longest registered command name at the start of ``argv`` ('sae fit' before 'sae')."""
    for n in (2, 1):
        name = " ".join(argv[:n])
        if len(argv) >= n and name in COMMANDS:
            return COMMANDS[name], argv[n:]
    return None, argv


def parse_config(cmd: Command, rest: list[str]) -> Any:
    """The config of ``cmd`` from ``--config FILE|NAME`` and dotted overrides (None for a command without one)."""
    path = None
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 >= len(rest):
            raise C.ConfigError("--config needs a file path or a shipped config name")
        path = rest[i + 1]
        rest = rest[:i] + rest[i + 2:]
    else:
        eq = [a for a in rest if a.startswith("--config=")]
        if eq:
            path = eq[0].split("=", 1)[1]
            rest = [a for a in rest if a != eq[0]]
    return C.load(cmd.config, path, rest, section=config_section(cmd.name)) if cmd.config is not None else None


def run(argv: list[str]) -> Any:
    """Run ``revelio`` with ``argv`` (without the program name); returns the command's result."""
    _load_commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return None
    cmd, rest = split_command(argv)
    if cmd is None:
        tried = " ".join(argv[:2]) if len(argv) > 1 and not argv[1].startswith("-") else argv[0]
        hint = C.did_you_mean(tried, sorted(COMMANDS)) or C.did_you_mean(argv[0], sorted(COMMANDS))
        group = [n for n in COMMANDS if n.split()[0] == argv[0]]
        if group:
            raise C.ConfigError(f"'revelio {argv[0]}' needs a subcommand{hint if len(argv) > 1 else ''}: {', '.join(sorted(group))}")
        raise C.ConfigError(f"unknown command {argv[0]!r}{hint}; commands: {', '.join(sorted(COMMANDS))}")
    if cmd.raw:
        return cmd.func(rest)
    if "-h" in rest or "--help" in rest:
        print(command_help(cmd))
        return None
    print_config = "--print_config" in rest  # as LightningCLI: the full resolved config as YAML, then exit
    rest = [a for a in rest if a != "--print_config"]
    cfg = parse_config(cmd, rest)
    if print_config:
        import yaml

        print(yaml.safe_dump(C.to_dict(cfg) if cfg is not None else {}, sort_keys=False), end="")
        return None
    if cfg is None:
        return cmd.func()
    # one writer per output: a second run on the same --out is refused before any model is loaded
    from extraction.files import hold_output

    with hold_output(getattr(cfg, "out", None) or None):
        return cmd.func(cfg)


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import about optional torchvision image processors we never use.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric"):  # they print through their own handlers already
        logging.getLogger(name).propagate = False
    try:
        run(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as e:
        print(f"revelio: error: {user_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # `python -m revelio.cli` runs this file as __main__; the subcommands register into the
    # imported revelio.cli module, so dispatch through that one.
    from revelio.cli import main as _main

    raise SystemExit(_main())
