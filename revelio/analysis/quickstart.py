"""What the notebooks open: the outputs of ``revelio demo`` when they exist, else a small store and a token SAE
built on the zoo models in a minute or two."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def demo_outputs(model: str = "tiny-sd", roots: list[str | Path] | None = None) -> dict[str, Any] | None:
    """Store, SAE folder and compare tables of a finished ``revelio demo`` for ``model``, or None.

    Looked for under ``$REVELIO_DEMO_DIR``, then ``runs/demo`` of the current folder and of its parent (a
    notebook runs in ``notebooks/``).
    """
    if roots is None:
        roots = [os.environ["REVELIO_DEMO_DIR"]] if os.environ.get("REVELIO_DEMO_DIR") else []
        roots += [Path("runs/demo"), Path("../runs/demo")]
    for root in map(Path, roots):
        store, folder = root / "extract" / f"{model}.h5", root / "sae" / model / "sae"
        if store.exists() and (folder / "cfg.json").exists():
            npz, js = root / "compare" / model / "alignment.npz", root / "compare" / model / "alignment.json"
            return {"source": f"revelio demo outputs in {root.resolve()}", "store": store.resolve(),
                    "sae": folder.resolve(), "alignment": npz.resolve() if npz.exists() else None,
                    "alignment_json": js.resolve() if js.exists() else None}
    return None


def notebook_inputs(work: str | Path, model: str = "tiny-sd") -> dict[str, Any]:
    """``$REVELIO_STORE`` / ``$REVELIO_SAE`` when set, else the demo's outputs, else a quick build in ``work``."""
    if os.environ.get("REVELIO_STORE") and os.environ.get("REVELIO_SAE"):
        return {"source": "REVELIO_STORE / REVELIO_SAE", "store": Path(os.environ["REVELIO_STORE"]),
                "sae": Path(os.environ["REVELIO_SAE"]), "alignment": None, "alignment_json": None}
    found = demo_outputs(model)
    if found is not None:
        return found
    store, folder = quick_store_and_sae(work, model=model)
    return {"source": f"a quick build in {work} (run `make demo` for the full-size one)", "store": store,
            "sae": folder, "alignment": None, "alignment_json": None}


def quick_store_and_sae(work: str | Path, model: str = "tiny-sd", hook: str = "up_blocks.1", t: int = 250,
                        images: int = 64, expansion: int = 4, k: int = 8, max_steps: int = 300,
                        label: str = "colour") -> tuple[Path, Path]:
    """(store, SAE folder) in ``work``: shapes images through ``model`` at ``hook``/``t``, SAE on every position.

    The label is the largest object's colour by default: what the zoo models learned best (docs/probes.md).
    Both steps reuse finished files (the extraction resumes/refuses by config; the SAE is kept if present).
    """
    import sae

    from ..extraction_config import ExtractConfig, extract
    from ..config import load

    work = Path(work)
    store = work / f"shapes_{label}_{model}.h5"
    extract(load(ExtractConfig, overrides={
        "model": {"id": model}, "data": {"name": "shapes", "count": images, "label": label}, "hooks": [hook],
        "timesteps": [t], "prompt": "caption", "storage_dtype": "float32", "out": str(store), "progress": False}))
    folder = work / f"sae_{label}_{model}" / "sae"
    if not (folder / "cfg.json").exists():
        folder = sae.fit_from_store(store, hook, t, work / f"sae_{label}_{model}", expansion=expansion, k=k,
                                    samples="tokens", max_steps=max_steps)
    return store, Path(folder)
