"""Shared fixtures: deterministic torch, small thread count, paths to the paper's parity vectors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

VECTORS = Path(
    os.environ.get("EBT_VECTORS", Path(__file__).resolve().parents[2] / "shared" / "vectors")
)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def vectors_dir() -> Path:
    if not VECTORS.is_dir():
        pytest.skip(f"parity vectors not found at {VECTORS} (set EBT_VECTORS)")
    return VECTORS
