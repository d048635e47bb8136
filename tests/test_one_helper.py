"""One helper per job (issue 16.4): ``extraction.files.atomic_path`` writes every output, ``extraction.hooks.Hooks``
installs and removes every hook, ``extraction/store.py`` opens every store file; and no module goes around them."""

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from extraction import files as F
from extraction.hooks import Hooks

ROOT = Path(__file__).resolve().parents[1]


class Boom(RuntimeError):
    pass


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


# ---------------------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_file_keeps_the_old_file_and_no_temp_when_the_writer_raises(tmp_path, error):
    out = tmp_path / "table.csv"
    out.write_text("old\n")
    with pytest.raises(error):
        with F.atomic_path(out) as tmp:
            tmp.write_text("half of the new")
            assert tmp.parent == out.parent and tmp.exists()
            raise error("writer failed")
    assert out.read_text() == "old\n"
    assert _leftovers(tmp_path, out.name) == []


def test_atomic_write_keeps_the_old_file_and_no_temp_when_the_writer_raises(tmp_path):
    out = tmp_path / "cfg.json"
    out.write_text("{}")
    with pytest.raises(Boom):
        with F.atomic_write(out) as f:
            f.write('{"half": ')
            raise Boom()
    assert out.read_text() == "{}" and _leftovers(tmp_path, out.name) == []


def test_atomic_file_commits_with_the_umasks_mode(tmp_path):
    out = tmp_path / "fig.png"
    old = os.umask(0o027)
    try:
        with F.atomic_path(out, ext=".png") as tmp:
            assert tmp.name.endswith(".png")
            tmp.unlink()  # a writer that makes its own file, 0600
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"new")
            os.close(fd)
    finally:
        os.umask(old)
    assert out.read_bytes() == b"new" and out.stat().st_mode & 0o777 == 0o640
    assert _leftovers(tmp_path, out.name) == []


def test_atomic_folder_replaces_the_old_folder_and_fixes_modes(tmp_path):
    """A folder output (save_pretrained, an SAE): the new folder replaces the old whole; its 0600 files get
    the umask's modes (diffusers / safetensors write 0600)."""
    out = tmp_path / "model"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "old.bin").write_text("old")
    old = os.umask(0o022)
    try:
        with F.atomic_path(out, folder=True) as tmp:
            (tmp / "unet").mkdir(mode=0o700)
            fd = os.open(tmp / "unet" / "w.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
            (tmp / "model_index.json").write_text("{}")
    finally:
        os.umask(old)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["model_index.json", "unet", "unet/w.safetensors"]
    assert (out / "unet" / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert (out / "unet").stat().st_mode & 0o777 == 0o755 and out.stat().st_mode & 0o777 == 0o755
    assert _leftovers(tmp_path, out.name) == []  # neither the temporary nor .model.old


def test_atomic_folder_keeps_the_old_folder_when_the_writer_raises(tmp_path):
    out = tmp_path / "sae"
    out.mkdir()
    (out / "cfg.json").write_text("old")
    with pytest.raises(Boom):
        with F.atomic_path(out, folder=True) as tmp:
            (tmp / "cfg.json").write_text("new")
            raise Boom()
    assert [p.name for p in out.iterdir()] == ["cfg.json"] and (out / "cfg.json").read_text() == "old"
    assert _leftovers(tmp_path, out.name) == []


def test_a_kill_between_the_folder_swaps_two_renames_is_undone_at_the_next_write(tmp_path):
    """A real SIGKILL after the old folder moved aside and before the new one moved in: ``path`` is gone and
    ``.<name>.old`` holds the last complete version; the next write of the output puts it back first."""
    out = tmp_path / "sae"
    out.mkdir()
    (out / "cfg.json").write_text("old")
    code = ("import os, signal, sys\nimport extraction.files as F\nreal = os.replace\ncalls = []\n"
            "def replace(a, b):\n    calls.append(a)\n    if len(calls) == 2:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n    real(a, b)\n"
            "F.os.replace = replace\n"
            f"with F.atomic_path({str(out)!r}, folder=True) as tmp:\n    (tmp / 'cfg.json').write_text('new')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not out.exists() and (tmp_path / ".sae.old" / "cfg.json").read_text() == "old"
    with pytest.raises(Boom):  # a failed next write still leaves the last complete version in place
        with F.atomic_path(out, folder=True) as tmp:
            raise Boom()
    assert (out / "cfg.json").read_text() == "old" and not (tmp_path / ".sae.old").exists()
    F.clean_stale_tmps(tmp_path)  # the killed writer's temporary folder
    with F.atomic_path(out, folder=True) as tmp:
        (tmp / "cfg.json").write_text("new")
    assert (out / "cfg.json").read_text() == "new" and _leftovers(tmp_path, out.name) == []
    assert F.recover_folder(out) is False  # nothing to undo


def test_scratch_path_is_removed_even_when_the_body_raises(tmp_path):
    with pytest.raises(Boom):
        with F.scratch_path(tmp_path / "cache.npy", ext=".npy") as tmp:
            tmp.write_bytes(b"x")
            raise Boom()
    assert list(tmp_path.iterdir()) == []


def test_sae_save_keeps_the_old_folder_when_writing_fails(tmp_path, monkeypatch):
    """A real caller: sae.io.save over an existing SAE folder, the weights writer failing half-way."""
    import sae.io as sio
    from sae.model import SparseAutoencoder

    model = SparseAutoencoder(8, 16, k=2)
    folder = sio.save(model, tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(tensors, path, *a, **k):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sio, "save_file", broken)
    with pytest.raises(F.WriteFailed, match="no space left on device"):
        sio.save(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert _leftovers(tmp_path, "sae") == []


# ---------------------------------------------------------------------------------------------- hooks


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))


def _n_hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def test_hooks_are_all_removed_when_the_body_raises():
    net, seen = _net(), []
    with pytest.raises(Boom):
        with Hooks(net) as hooks:
            hooks.forward("0", lambda m, a, out: seen.append("0"))
            hooks.pre("2.1", lambda m, a: seen.append("2.1 pre"))
            hooks.forward(net[2], lambda m, a, k, out: seen.append("2"), with_kwargs=True)
            hooks.pre(net, lambda m, a, k: seen.append("root"), with_kwargs=True)
            assert len(hooks) == 4 and _n_hooks(net) == 4
            net(torch.zeros(1, 4))
            raise Boom()
    assert seen == ["root", "0", "2.1 pre", "2"]
    assert _n_hooks(net) == 0 and len(hooks) == 0
    net(torch.zeros(1, 4))
    assert len(seen) == 4  # nothing fires any more


def test_hooks_restore_processors_and_finish_removing_when_one_removal_fails():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.processor = "original"

        def set_processor(self, p):
            self.processor = p

    net = nn.Sequential(Attn(), nn.Linear(2, 2))
    hooks = Hooks(net)
    assert hooks.processor("0", "wrapped") == "original" and net[0].processor == "wrapped"
    hooks.forward("1", lambda *a: None)
    hooks._undo.append(lambda: (_ for _ in ()).throw(Boom("a removal failed")))  # the newest undo step raises
    with pytest.raises(Boom):
        hooks.remove()
    assert net[0].processor == "original" and _n_hooks(net) == 0
    hooks.remove()  # again: nothing left to do


def test_hooks_name_close_matches_for_a_wrong_module():
    with pytest.raises(KeyError, match=r"unknown module '2\.O'; close matches: .*2\.0.*; valid: 0, 1, 2, 2\.0, 2\.1"):
        Hooks(_net()).forward("2.O", lambda *a: None)
    with pytest.raises(TypeError, match="no attention processor"):
        Hooks(_net()).processor("0", "p")


def test_saliency_and_steering_hooks_leave_nothing_behind_on_error():
    from revelio.saliency.hooks import captured, hooked, swapped_processors

    net = _net()
    with pytest.raises(Boom):
        with captured(out_a=net[0], in_b=net[2][1]), hooked(net[2], pre=lambda m, a: None, post=lambda m, a, o: None):
            assert _n_hooks(net) == 4
            raise Boom()
    assert _n_hooks(net) == 0
    with pytest.raises(Boom):
        with swapped_processors({}, lambda *a: None):
            raise Boom()


# ---------------------------------------------------------------------------------------------- nobody goes around

# Where the low-level call is allowed, and why. tests/ and notebooks/ are not scanned (tests poke at internals).
ALLOWED = {
    "rename": {"extraction/files.py": "the atomic-write helper itself"},
    "hook": {"extraction/hooks.py": "the hook helper itself"},
    "h5py": {"extraction/store.py": "the store itself",
             "benchmarks/sae_data.py": "the raw-h5py read baseline the SAE data path is measured against",
             "revelio/segmentation/data.py": "reads gtsegs_ijcv.mat (MATLAB v7.3 = HDF5), not an activation store"},
}
RENAMES = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move"), ("tempfile", "mkstemp"),
           ("tempfile", "mkdtemp"), ("tempfile", "NamedTemporaryFile")}
HOOKS = {"register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
         "register_full_backward_pre_hook", "register_backward_hook", "set_processor", "set_attn_processor"}


def _calls(path: Path) -> list[tuple[str, int, str]]:
    """(kind, line, text) of every low-level call in ``path`` the helpers own."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        f, attr = node.func, node.func.attr
        base = f.value.id if isinstance(f.value, ast.Name) else None
        if (base, attr) in RENAMES:
            found.append(("rename", node.lineno, f"{base}.{attr}"))
        elif attr in ("rename", "replace") and base not in ("os", "dataclasses") and len(node.args) == 1 \
                and not node.keywords:  # Path.rename / Path.replace (str.replace takes two arguments)
            found.append(("rename", node.lineno, f"<path>.{attr}"))
        elif attr in HOOKS:
            found.append(("hook", node.lineno, attr))
        elif base == "h5py" and attr == "File":
            found.append(("h5py", node.lineno, "h5py.File"))
    return sorted(found, key=lambda c: c[1])


def test_no_module_goes_around_the_helpers():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.split("/")[0] in ("tests", "notebooks") or "/." in f"/{rel}" or rel.startswith(("build/", "dist/")):
            continue
        for kind, line, what in _calls(path):
            if rel not in ALLOWED[kind]:
                bad.append(f"{rel}:{line}: {what}")
    assert not bad, "use extraction.files.atomic_path / extraction.hooks.Hooks / extraction.store:\n" + "\n".join(bad)


def test_the_scan_finds_each_kind(tmp_path):
    """The scanner above sees what it must refuse (so the test can fail)."""
    p = tmp_path / "m.py"
    p.write_text("import os, h5py\nos.replace(a, b)\ntmp.replace(out)\nname.replace('a', 'b')\n"
                 "m.register_forward_hook(f)\nattn.set_processor(p)\nh5py.File(x, 'r')\n")
    assert [(k, w) for k, _, w in _calls(p)] == [("rename", "os.replace"), ("rename", "<path>.replace"),
                                                  ("hook", "register_forward_hook"), ("hook", "set_processor"),
                                                  ("h5py", "h5py.File")]
