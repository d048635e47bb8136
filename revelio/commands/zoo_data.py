"""Small utility subcommands: the model zoo and data-set previews."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..cli import command
from ..config import field
from ..datasets import DataConfig, load_dataset


@dataclass
class ZooConfig:
    name: str = field("all", help="zoo model to build/load, or 'all'")
    random_init: bool = field(False, help="use the seeded random-init build even when trained weights ship")
    seed: int = field(0, help="seed of the random-init build")


@command("zoo", ZooConfig)
def zoo_cmd(cfg: ZooConfig) -> dict[str, str]:
    """List the embedded tiny models, building (random init) or locating (trained) each one."""
    from ..zoo import ZOO_NAMES, shipped_path, zoo_path

    names = ZOO_NAMES if cfg.name == "all" else [cfg.name]
    out = {}
    for n in names:
        p = zoo_path(n, random_init=cfg.random_init, seed=cfg.seed)
        kind = "trained, shipped" if shipped_path(n) == p else "random init, cached"
        print(f"{n:<10} {kind:<18} {p}")
        out[n] = str(p)
    return out


@dataclass
class PreviewConfig:
    data: DataConfig = field(default_factory=DataConfig, help="")
    out: str = field("runs/preview.png", help="PNG grid to write")
    columns: int = field(8, min=1, help="images per row")
    show_masks: bool = field(False, help="add a row of mask overlays under each image row (shapes/digits)")


@command("data", PreviewConfig)
def data_cmd(cfg: PreviewConfig) -> Path:
    """Render a grid of a data set's images (and captions) to PNG, to look at what a model will see."""
    from ..viz import sample_grid

    ds = load_dataset(cfg.data)
    samples = list(ds.iter_samples(list(range(min(len(ds), cfg.columns * 2)))))
    out = Path(cfg.out)
    sample_grid(samples, out, columns=cfg.columns, show_masks=cfg.show_masks)
    print(f"{ds.name}: {len(ds)} images; wrote {len(samples)} to {out}")
    for s in samples[: cfg.columns]:
        print(f"  {s.id}: label={s.label} '{s.caption}'")
    return out
