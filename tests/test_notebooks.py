"""The notebooks run top to bottom without edits (nbclient, the venv's python3 kernel) on the zoo models."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from test_analysis import make_sae

pytestmark = pytest.mark.slow  # each notebook runs in its own Jupyter kernel, top to bottom

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory, monkeypatch_module):
    """A `revelio demo`-shaped folder (runs/demo/extract/tiny-sd.h5 with the colour label, runs/demo/sae/tiny-sd/sae)
    that the notebooks find by themselves through REVELIO_DEMO_DIR."""
    import torch

    from revelio.commands.extract import ExtractConfig, extract_cmd
    from revelio.config import load

    work = tmp_path_factory.mktemp("notebooks")
    demo = work / "runs" / "demo"
    store = demo / "extract" / "tiny-sd.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract_cmd(load(ExtractConfig, overrides={
            "model": {"id": "tiny-sd"}, "data": {"name": "shapes", "count": 24, "label": "colour"},
            "hooks": ["up_blocks.1"], "timesteps": [250], "prompt": "caption", "storage_dtype": "float32",
            "batch_size": 12, "out": str(store), "progress": False}))
    finally:
        torch.set_num_threads(threads)
    make_sae(store, "up_blocks.1", 250, demo / "sae" / "tiny-sd" / "sae")
    for var in ("REVELIO_STORE", "REVELIO_SAE"):
        monkeypatch_module.delenv(var, raising=False)
    monkeypatch_module.setenv("REVELIO_DEMO_DIR", str(demo))
    monkeypatch_module.setenv("REVELIO_NOTEBOOK_DIR", str(work))
    monkeypatch_module.setenv("REVELIO_STEPS", "2")
    monkeypatch_module.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: tiny models run faster on one thread
    return work


def test_notebook_inputs_prefer_the_demo_outputs(tmp_path, monkeypatch):
    from revelio.analysis.quickstart import demo_outputs

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REVELIO_DEMO_DIR", raising=False)
    assert demo_outputs("tiny-sd") is None
    (tmp_path / "runs/demo/extract").mkdir(parents=True)
    (tmp_path / "runs/demo/extract/tiny-sd.h5").write_bytes(b"")
    (tmp_path / "runs/demo/sae/tiny-sd/sae").mkdir(parents=True)
    (tmp_path / "runs/demo/sae/tiny-sd/sae/cfg.json").write_text("{}")
    sub = tmp_path / "notebooks"
    sub.mkdir()
    monkeypatch.chdir(sub)  # a notebook runs in notebooks/: the demo is one folder up
    found = demo_outputs("tiny-sd")
    assert found["store"] == (tmp_path / "runs/demo/extract/tiny-sd.h5").resolve() and found["alignment"] is None


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def run_notebook(name: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == kind]


def test_feature_browser_notebook(notebook_env):
    nb = run_notebook("feature_browser.ipynb", notebook_env)
    assert not _outputs(nb, "error")
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    assert "using revelio demo outputs in" in text and "label: colour" in text
    html = [o["data"]["text/html"] for o in _outputs(nb, "display_data") if "text/html" in o.get("data", {})]
    assert any("Top-activating images" in h and "data:image/png;base64" in h for h in html)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in _outputs(nb, "display_data")
               + _outputs(nb, "execute_result"))
    index = notebook_env / "dashboard" / "index.html"
    assert index.exists() and "latent_" in index.read_text()


def test_steering_notebook(notebook_env):
    nb = run_notebook("steering.ipynb", notebook_env)
    assert not _outputs(nb, "error")
    images = [o for o in _outputs(nb, "display_data") if "image/png" in o.get("data", {})]
    assert len(images) == 2  # before/after, then the masked/early-steps and removal variants
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    assert "using revelio demo outputs in" in text
    assert "steering latent" in text and "the best match of 'blue'" in text  # a named concept, and which latent
    change = float(text.split("mean |change| per pixel:")[1].split()[0])
    assert change > 0


def test_quickstart_store_uses_the_colour_label(tmp_path):
    # the notebooks' default store: labels are the largest object's colour (docs/probes.md: the label that shows most)
    from extraction.store import open_store
    from revelio.analysis.quickstart import quick_store_and_sae
    from revelio.datasets import Shapes

    store, folder = quick_store_and_sae(tmp_path, images=6, max_steps=2)
    ds = Shapes(size=64, count=6, label="colour")
    with open_store(store) as st:
        assert st.config["data"]["label"] == "colour"
        assert list(st.labels) == [ds[ds.ids().index(i)].label for i in st.ids]
    assert (folder / "cfg.json").exists()
