"""``revelio demo``: every stage on the embedded default, ending with where each result is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli import command
from ..config import field


@dataclass
class DemoConfig:
    out: str = field("runs/demo", help="folder for every result of the demo")
    images: int = field(64, help="images of the shapes world per model")
    seed: int = field(0, help="seed for data, noise and training")


@command("demo", DemoConfig)
def demo_cmd(cfg: DemoConfig) -> dict:
    """Run the whole pipeline on the embedded tiny models and the shapes world."""
    from ..datasets import Shapes
    from ..viz import sample_grid
    from ..zoo import ZOO_NAMES, load_pipeline, shipped_path

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = Shapes(size=64, count=cfg.images, seed=cfg.seed)
    grid = sample_grid(list(ds.iter_samples(list(range(16)))), out / "shapes.png", show_masks=True)
    print(f"data: shapes world, {len(ds)} images of {len(ds.class_names)} classes; preview {grid}")
    results = {"data_preview": str(grid)}
    for name in ("tiny-sd", "tiny-flux"):
        pipe = load_pipeline(name)
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        n = sum(p.numel() for p in denoiser.parameters())
        kind = "trained" if shipped_path(name) else "random init"
        kw = {} if name == "tiny-sd" else {"max_sequence_length": 32}
        img = pipe(ds[0].caption, num_inference_steps=8, height=64, width=64, output_type="pil",
                   generator=torch.Generator().manual_seed(cfg.seed), **kw).images[0]
        path = out / f"{name}-sample.png"
        img.save(path)
        print(f"model: {name} ({type(pipe).__name__}, {type(denoiser).__name__}, {n / 1e6:.2f}M params, {kind}); "
              f"generated '{ds[0].caption}' -> {path}")
        results[name] = str(path)
    print(f"zoo: {', '.join(ZOO_NAMES)}")
    return results
