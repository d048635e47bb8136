"""A small store and a token SAE to explore, built on the zoo models in a minute (used by the notebooks)."""

from __future__ import annotations

from pathlib import Path


def quick_store_and_sae(work: str | Path, model: str = "tiny-sd", hook: str = "up_blocks.1", t: int = 25,
                        images: int = 32, expansion: int = 2, k: int = 8, max_steps: int = 100) -> tuple[Path, Path]:
    """(store, SAE folder) in ``work``: shapes images through ``model`` at ``hook``/``t``, SAE on every position.

    Both steps reuse finished files (the extraction resumes/refuses by config; the SAE is kept if present).
    """
    import sae

    from ..extraction_config import ExtractConfig, extract
    from ..config import load

    work = Path(work)
    store = work / f"shapes_{model}.h5"
    extract(load(ExtractConfig, overrides={
        "model": {"id": model}, "data": {"name": "shapes", "count": images}, "hooks": [hook], "timesteps": [t],
        "prompt": "caption", "storage_dtype": "float32", "out": str(store), "progress": False}))
    folder = work / f"sae_{model}" / "sae"
    if not (folder / "cfg.json").exists():
        folder = sae.fit_from_store(store, hook, t, work / f"sae_{model}", expansion=expansion, k=k, samples="tokens",
                                    max_steps=max_steps)
    return store, Path(folder)
