"""The notebooks run top to bottom without edits (nbclient, the venv's python3 kernel) on the zoo models."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from test_analysis import make_sae

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def notebook_env(sd_store, tmp_path_factory, monkeypatch_module):
    work = tmp_path_factory.mktemp("notebooks")
    folder = make_sae(sd_store, "up_blocks.1", 25, work / "sd_sae")  # not "sae": the cwd would shadow the package
    monkeypatch_module.setenv("REVELIO_STORE", str(sd_store))
    monkeypatch_module.setenv("REVELIO_SAE", str(folder))
    monkeypatch_module.setenv("REVELIO_NOTEBOOK_DIR", str(work))
    monkeypatch_module.setenv("REVELIO_STEPS", "2")
    monkeypatch_module.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: tiny models run faster on one thread
    return work


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
