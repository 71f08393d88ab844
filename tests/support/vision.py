"""The tiny image and video setups the image and video tests share."""

from __future__ import annotations

from pathlib import Path

from ebt.config import Config, load_config
from support import CONFIGS
from support.text import four_step_run

IMAGE_SYSTEM2 = [
    "think.step_size_learnable=false",
    "think.step_size_random_scale=2",
    "think.random_steps=1",
    "think.random_steps_min=2",
    "think.langevin_noise=0.01",
    "think.replay_buffer=true",
    "think.truncate=true",
    "think.detach=false",
]


def image_config(run_dir: Path, name: str = "tiny.toml", *overrides: str) -> Config:
    """A configs/image preset shrunk to 8 x 8 crops, width 16, one block, 4 steps."""
    base = [
        "data.image_size=8",
        "model.dim=16",
        "model.layers=1",
        "model.heads=2",
        "model.patch_size=4",
        "train.batch_size=4",
    ]
    return load_config(CONFIGS / "image" / name, base + four_step_run(run_dir) + list(overrides))
