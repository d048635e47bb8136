"""``revelio zoo train``: train the zoo's tiny models on the shapes world (see revelio/zoo/train.py)."""

from __future__ import annotations

from pathlib import Path

from ..cli import command
from ..zoo.config import ZooTrainConfig


@command("zoo train", ZooTrainConfig)
def zoo_train_cmd(cfg: ZooTrainConfig) -> dict[str, Path]:
    """Train the shared VAE, then tiny-sd and tiny-flux, on shapes captions (seeded; Lightning, progress bars)."""
    from ..zoo.train import train_zoo

    return train_zoo(cfg)
