import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from revelio import cli
from revelio import config as C


@dataclass
class Inner:
    id: str = C.field("tiny-sd", help="model")
    steps: int = C.field(4)


@dataclass
class Outer:
    model: Inner = C.field(default_factory=Inner)
    timesteps: list[int] = C.field(default_factory=lambda: [25])
    dtype: str = C.field("float32")
    flag: bool = C.field(False)
    path: str | None = C.field(None)


def test_yaml_and_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  id: tiny-flux\ntimesteps: [10, 50]\n")
    cfg = C.load(Outer, f, ["--model.steps", "8", "--flag", "true", "--timesteps=[1,2,3]", "--path", "x.h5"])
    assert cfg.model.id == "tiny-flux" and cfg.model.steps == 8
    assert cfg.timesteps == [1, 2, 3] and cfg.flag is True and cfg.path == "x.h5"
    assert C.to_dict(cfg)["model"] == {"id": "tiny-flux", "steps": 8}


def test_unknown_key_lists_valid_ones(tmp_path):
    with pytest.raises(C.ConfigError, match="valid keys: id, steps"):
        C.load(Outer, None, ["--model.idd", "x"])
    with pytest.raises(C.ConfigError, match="valid keys: model, timesteps, dtype, flag, path"):
        C.load(Outer, None, {"modle": {}})


def test_type_errors_are_clear(tmp_path):
    with pytest.raises(C.ConfigError, match="model.steps: expected an integer"):
        C.load(Outer, None, ["--model.steps", "many"])
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(Outer, tmp_path / "missing.yaml")
    with pytest.raises(C.ConfigError, match="needs a value"):
        C.parse_overrides(["--model.id"])


@dataclass
class WithOwnDefault:
    model: Inner = C.field(default_factory=lambda: Inner(id="tiny-flux", steps=2), help="")


def test_nested_section_keeps_its_own_default():
    # a partial override of a section whose default differs from its class defaults keeps the rest
    cfg = C.load(WithOwnDefault, None, ["--model.steps", "8"])
    assert cfg.model.id == "tiny-flux" and cfg.model.steps == 8
    assert C.load(WithOwnDefault).model == Inner(id="tiny-flux", steps=2)
    rows = {k: d for k, d, _ in C.describe(WithOwnDefault)}
    assert rows == {"model.id": "tiny-flux", "model.steps": "2"}


def test_negative_numbers_are_values():
    assert C.parse_overrides(["--x", "-1"]) == {"x": -1}


def test_cli_lists_commands_and_keys(capsys):
    cli.run(["--help"])
    out = capsys.readouterr().out
    for name in ("zoo", "data", "demo"):
        assert name in out
    cli.run(["data", "--help"])
    out = capsys.readouterr().out
    assert "--data.name" in out and "--columns" in out


def test_cli_errors_exit_2_with_valid_names(capsys):
    assert cli.main(["data", "--data.nam", "x"]) == 2
    assert "valid keys: name, path" in capsys.readouterr().err
    assert cli.main(["nonsense"]) == 2
    assert "unknown command 'nonsense'; commands:" in capsys.readouterr().err
    assert cli.main(["data", "--data.name", "imagenet"]) == 2
    assert "valid: shapes, digits, folder, hf" in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).parent / "revelio"
    r = subprocess.run([str(exe), "data", "--data.count", "4", "--columns", "4", "--out", str(tmp_path / "g.png")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g.png").stat().st_size > 1000


@pytest.mark.parametrize("module", ["revelio", "revelio.cli"])
def test_python_dash_m_lists_commands(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "extract" in r.stdout and "demo" in r.stdout


HEAVY = ("torch", "diffusers", "lightning", "transformers", "sklearn")


def test_help_imports_nothing_heavy():
    """Building every command's --help (in a fresh interpreter) imports no torch/diffusers/lightning/transformers."""
    code = ("import sys, io, contextlib\n"
            "from revelio import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.run(['--help'])\n"
            "    for name in sorted(cli.COMMANDS):\n"
            "        cli.run(name.split() + ['--help'])\n"
            f"print(len(cli.COMMANDS), ','.join(m for m in {HEAVY!r} if m in sys.modules) or '-')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    n, heavy = r.stdout.split()
    assert heavy == "-", f"--help imported {heavy}"
    assert int(n) >= 14  # every command module registered (none skipped as missing)


def test_unknown_names_suggest_the_closest(capsys):
    assert cli.main(["extrat"]) == 2
    assert "unknown command 'extrat' (did you mean 'extract'?)" in capsys.readouterr().err
    assert cli.main(["sae", "fitt"]) == 2
    assert "(did you mean 'sae fit'?)" in capsys.readouterr().err
    assert cli.main(["extract", "--timestep", "3"]) == 2
    assert "'timestep' (did you mean 'timesteps'?)" in capsys.readouterr().err
    assert cli.main(["data", "--data.nmae", "x"]) == 2
    assert "'data.nmae' in 'data' (did you mean 'name'?)" in capsys.readouterr().err
    assert cli.main(["data", "--colums", "3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'columns'" in err and "valid keys:" in err


def test_sae_fit_trainer_keys_match_lightning_signature():
    """The static `--trainer.*` list (help needs no torch) is every YAML-able Trainer argument, and no other."""
    import dataclasses
    import inspect

    import lightning

    from revelio.commands.sae import TRAINER_OWNED, SAETrainerConfig, trainer_kwargs

    params = inspect.signature(lightning.Trainer.__init__).parameters
    keys = [f.name for f in dataclasses.fields(SAETrainerConfig)]
    assert set(keys) | set(TRAINER_OWNED) == set(params), "Trainer arguments changed: update SAETrainerConfig"
    assert not set(keys) & set(TRAINER_OWNED)
    # defaults are Lightning's, except the project's own nine
    ours = {"max_steps", "accelerator", "devices", "strategy", "num_nodes", "precision", "log_every_n_steps",
            "val_check_interval", "enable_progress_bar"}
    for f in dataclasses.fields(SAETrainerConfig):
        if f.name not in ours:
            assert f.default == params[f.name].default, f.name
    kw = trainer_kwargs(SAETrainerConfig(max_epochs=2, gradient_clip_val=0.5))
    assert kw["max_epochs"] == 2 and kw["gradient_clip_val"] == 0.5 and set(kw) == set(keys)


def test_sae_fit_help_print_config_and_choices(capsys):
    cli.run(["sae", "fit", "--help"])
    out = capsys.readouterr().out
    for key in ("--trainer.max_epochs", "--trainer.gradient_clip_val", "--trainer.accumulate_grad_batches",
                "--trainer.deterministic", "--trainer.profiler"):
        assert key in out
    assert "[auto | cpu | gpu | cuda | mps | tpu]" in out  # Literal choices shown
    assert "[norm | value]" in out
    cli.run(["sae", "fit", "--print_config", "--trainer.max_epochs", "3", "--model.k", "4",
             "--trainer.precision", "bf16-mixed"])
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 3 and printed["trainer"]["precision"] == "bf16-mixed"
    assert printed["model"]["k"] == 4 and printed["data"]["samples"] == "pooled" and printed["out"] == "runs/sae"
    assert C.from_dict(cli.COMMANDS["sae fit"].config, printed).model.k == 4  # the print is a valid config file
    assert cli.main(["sae", "fit", "--trainer.accelerator", "gpus"]) == 2
    assert "trainer.accelerator: 'gpus' is not one of" in capsys.readouterr().err
    assert cli.main(["sae", "fit", "--trainer.gradient_clip_algorithm", "nrm"]) == 2
    assert "(did you mean 'norm'?)" in capsys.readouterr().err
    assert cli.main(["sae", "fit", "--trainer.max_epoch", "3"]) == 2
    assert "(did you mean 'max_epochs'?)" in capsys.readouterr().err


def test_command_modules_are_named_after_their_commands():
    cli._load_commands()
    for name, cmd in cli.COMMANDS.items():
        words = cmd.func.__module__.rsplit(".", 1)[1].split("_")
        assert name.split()[0] in words, f"'revelio {name}' lives in {cmd.func.__module__}"


def test_shipped_configs_load_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    """``--config tiny-sd`` names the shipped file of the command's folder; a path (here ``configs/...``, which
    does not exist under the other cwd) still works."""
    from revelio.commands.extract import ExtractConfig
    from revelio.commands.sae import SAEFitConfig

    cli._load_commands()
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    sections = {cli.config_section(n) for n in cli.COMMANDS} - {None}
    assert sections == {p.name for p in (root / "configs").iterdir() if p.is_dir()}
    for section in sections:
        for f in sorted((root / "configs" / section).glob("*.yaml")):
            assert C.find_config(f.stem, section).resolve() == f.resolve()
            assert C.find_config(f"configs/{section}/{f.name}", section).resolve() == f.resolve()
    for cls, section in ((ExtractConfig, "extract"), (SAEFitConfig, "sae")):
        by_name = C.to_dict(C.load(cls, "tiny-sd", section=section))
        assert by_name == C.to_dict(C.load(cls, root / "configs" / section / "tiny-sd.yaml"))
    assert C.find_config("sae/tiny-sd", "extract") == C.SHIPPED / "sae" / "tiny-sd.yaml"
    with pytest.raises(C.ConfigError, match="several shipped configs: extract/tiny-sd, sae/tiny-sd"):
        C.find_config("tiny-sd")
    assert cli.main(["extract", "--config", "tiny-sdd"]) == 2
    err = capsys.readouterr().err
    assert "'tiny-sdd' does not exist and is no shipped config" in err and "tiny-flux, tiny-sd" in err


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    """A wheel (not the editable clone) carries configs/ as revelio/configs; a shipped name resolves from it."""
    pytest.importorskip("setuptools", reason="the wheel is built without isolation, from the venv's setuptools")
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    import shutil

    shutil.copytree(root, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache", "wandb"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(f"revelio/configs/{p.parent.name}/{p.name}" for p in (root / "configs").glob("*/*.yaml"))
    assert shipped and set(shipped) <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    r = subprocess.run([sys.executable, "-c", "from revelio.config import find_config, SHIPPED; "
                        "p = find_config('tiny-sd', 'extract'); print(p); assert p.is_file() and 'site' in str(p)"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr[-2000:]


def _readme_recipe_commands() -> list[list[str]]:
    """The ``revelio ...`` lines of README's real-model recipes (continuations joined, torchrun lines unwrapped)."""
    import re
    import shlex

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("## Running the same on real models (GPU)", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    out = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("torchrun"):
            line = "revelio " + line.split("$(which revelio)", 1)[1]
        if line.startswith("revelio "):
            out.append(shlex.split(line)[1:])
    return out


def test_readme_recipes_chain_their_paths(tmp_path, monkeypatch):
    """Every path one README recipe step writes is the path the next step reads (configs resolved as the CLI does,
    from another folder): extract -> sae fit -> probe / compare -> browse."""
    cli._load_commands()
    monkeypatch.chdir(tmp_path)
    written: set[str] = set()
    steps = []
    for argv in _readme_recipe_commands():
        cmd, rest = cli.split_command(argv)
        assert cmd is not None, argv
        cfg = cli.parse_config(cmd, rest)
        steps.append((cmd.name, cfg))
        reads = {"sae fit": lambda c: [c.data.store], "probe": lambda c: [c.store, *c.sae],
                 "compare": lambda c: [c.source.sae], "browse": lambda c: [c.source.sae, c.alignment]}.get(cmd.name)
        for path in (reads(cfg) if reads else []):
            assert path in written, f"{cmd.name} reads {path}, which no earlier recipe step writes ({sorted(written)})"
        if cmd.name == "extract":
            written.add(cfg.out)
            assert cfg.data.name in ("folder", "hf") and cfg.data.path, "recipes run on real images"
        elif cmd.name == "sae fit":
            written.add(f"{cfg.out}/sae")
        elif cmd.name == "compare":
            written.add(f"{cfg.out}/alignment.npz")
    names = [n for n, _ in steps]
    assert names.count("extract") >= 3 and {"sae fit", "probe", "compare", "browse", "segment"} <= set(names)
