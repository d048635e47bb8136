"""A small store and a token SAE to explore, built on the zoo models in a minute (used by the notebooks)."""

from __future__ import annotations

from pathlib import Path


def quick_store_and_sae(work: str | Path, model: str = "tiny-sd", hook: str = "up_blocks.1", t: int = 25,
                        images: int = 32, expansion: int = 2, k: int = 8, max_steps: int = 100,
                        label: str = "colour") -> tuple[Path, Path]:
    """(store, SAE folder) in ``work``: shapes images through ``model`` at ``hook``/``t``, SAE on every position.

    ``label`` is the shapes attribute the store's labels (and so the browser's purity) are: ``colour``
    by default, the one the zoo models learned (docs/probes.md: latents are far purer on it than on shape).

    Both steps reuse finished files (the extraction resumes/refuses by config; the SAE is kept if present).
    """
    import sae

    from ..commands.extract import ExtractConfig, extract_cmd
    from ..config import load

    work = Path(work)
    store = work / f"shapes_{model}_{label}.h5"
    extract_cmd(load(ExtractConfig, overrides={
        "model": {"id": model}, "data": {"name": "shapes", "count": images, "label": label}, "hooks": [hook], "timesteps": [t],
        "prompt": "caption", "storage_dtype": "float32", "out": str(store), "progress": False}))
    folder = work / f"sae_{model}" / "sae"
    if not (folder / "cfg.json").exists():
        folder = sae.fit_from_store(store, hook, t, work / f"sae_{model}", expansion=expansion, k=k, samples="tokens",
                                    max_steps=max_steps)
    return store, Path(folder)
