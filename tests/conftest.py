"""Shared fixtures: deterministic torch, small thread count, the paper's parity vectors.

The parity vectors (tests/vectors, or EBT_VECTORS) are mandatory: a run that collects a test
needing them while one is missing stops before any test runs, with one line naming what is missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import VECTORS, missing_vectors
from support.text import write_corpus


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any("vectors_dir" in getattr(item, "fixturenames", ()) for item in items):
        return
    missing = missing_vectors()
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        pytest.exit(f"parity vectors missing under {VECTORS}: {shown} (set EBT_VECTORS)", 1)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The parity vectors; their presence was checked at collection (never a skip)."""
    return VECTORS


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run far faster than with OpenMP spinning on 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp corpus file; token caches go to tmp; torch threads are restored afterwards."""
    monkeypatch.setenv("EBT_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield write_corpus(tmp_path / "corpus.txt")
    torch.set_num_threads(threads)


@pytest.fixture
def restore_threads():
    """Torch's intra-op thread count is put back after a test that trains (num_threads=1)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
