"""The layering, proved: the stage packages never import ``revelio``; ``revelio.analysis`` never imports the commands.

Layers, bottom up: the stages (``extraction``, ``sae``, ``probes``) -> ``revelio`` (datasets, zoo, saliency,
analysis, ...) -> ``revelio.commands`` and ``revelio.cli``. An import may only point down.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["extraction", "sae", "probes"]

# Run in a fresh interpreter: a meta-path finder refuses `revelio` and every submodule, then every module of
# the stage package is imported (lazy ones too, found by walking the package).
BLOCKED_IMPORT = """
import importlib, importlib.abc, pkgutil, sys

class NoRevelio(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "revelio" or name.startswith("revelio."):
            raise ImportError(f"back-import of {name!r} from a stage package")
        return None

sys.meta_path.insert(0, NoRevelio())
for stage in sys.argv[1:]:
    pkg = importlib.import_module(stage)
    names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    for name in names:
        importlib.import_module(name)
    print(stage, len(names))
assert not any(m == "revelio" or m.startswith("revelio.") for m in sys.modules), "revelio got imported"
"""


def test_stages_import_with_revelio_blocked():
    """One interpreter for the three stages (torch is imported once)."""
    r = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT, *STAGES], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = dict(line.split() for line in r.stdout.splitlines())
    assert set(counts) == set(STAGES) and all(int(n) >= 3 for n in counts.values())  # the walk found modules


def test_the_blocker_catches_a_back_import(tmp_path):
    """The same script fails on a stage package that imports revelio (so the test above can fail)."""
    pkg = tmp_path / "badstage"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "b.py").write_text("from revelio.config import field\n")
    (pkg / "c.py").write_text("y = 2\n")
    r = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT, "badstage"], capture_output=True, text=True,
                       cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "back-import of 'revelio'" in r.stderr


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def _modules(folder: Path, package: str):
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(folder).with_suffix("")
        parts = [package, *rel.parts]
        yield path, ".".join(parts[:-1])  # the package a relative import in this file starts from


@pytest.mark.parametrize("stage", STAGES)
def test_stage_source_names_no_revelio_module(stage):
    """Also the imports inside functions, which an import test does not execute."""
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p, pkg in _modules(ROOT / stage, stage)
           for line, mod in imported_modules(p, pkg) if mod == "revelio" or mod.startswith("revelio.")]
    assert not bad, "\n".join(bad)


def test_analysis_never_imports_the_commands():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p, pkg in _modules(ROOT / "revelio" / "analysis",
                                                                                "revelio.analysis")
           for line, mod in imported_modules(p, pkg)
           if mod.startswith("revelio.commands") or mod.startswith("revelio.cli")]
    assert not bad, "\n".join(bad)


def test_import_scanner_resolves_relative_imports(tmp_path):
    """The scanner itself: a relative import two levels up is seen as the absolute module it names."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ..commands.extract import ExtractConfig\nimport os\n")
    mods = [m for _, m in imported_modules(f, "revelio.analysis")]
    assert "revelio.commands.extract" in mods and "os" in mods


def test_no_benchmark_script_shadows_a_package():
    # `python benchmarks/x.py` puts benchmarks/ first on sys.path: a script named like a package
    # (benchmarks/extraction.py did) hides that package from every other benchmark script.
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages >= {"extraction", "sae", "probes", "revelio"}
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    assert not scripts & packages, f"benchmark scripts named like packages: {sorted(scripts & packages)}"


def test_stage_configs_are_light():
    """Each stage owns its config in a module that imports neither torch nor h5py (``--help`` reads them)."""
    code = ("import sys\nimport extraction.config, sae.config, revelio.extraction_config\n"
            "print(','.join(m for m in ('torch', 'h5py', 'lightning', 'diffusers', 'safetensors') if m in sys.modules)"
            " or '-')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "-", f"a stage config imported {r.stdout.strip()}"
