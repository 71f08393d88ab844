"""Test support: shared setups, references and tolerances. Tests import from here, never from
another test module; pytest fixtures live in tests/conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
VECTORS = Path(os.environ.get("EBT_VECTORS", ROOT / "tests" / "vectors"))

VECTOR_FILES = ("ref.ckpt", "expected.pt")
VECTOR_SETS = (
    "ebt_time_embed",
    "ebt_default",
    "ebt_adaln",
    "transformer_pp",
    "image_ebt",
    "image_dit",
    "video_ebt_time_embed",
)


def missing_vectors(root: Path = VECTORS) -> list[str]:
    """The vector files (relative to `root`) that are not there."""
    wanted = [f"{name}/{file}" for name in VECTOR_SETS for file in VECTOR_FILES]
    return [path for path in wanted if not (root / path).is_file()]
