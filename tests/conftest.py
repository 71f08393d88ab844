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


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run far faster than with OpenMP spinning on 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
