"""Shared fixtures: deterministic torch, small thread count, paths to the paper's parity vectors."""

from __future__ import annotations

import os
import random
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


def write_corpus(path: Path, paragraphs: int = 60) -> Path:
    """Short sentences from a tiny grammar: learnable structure with some entropy left."""
    rng = random.Random(0)
    parts = (
        ["the cat", "a dog", "my bird", "one fox"],
        ["sat on", "ran to", "looked at"],
        ["the mat.", "a log.", "the hill.", "my hat."],
    )
    text = "\n\n".join(
        " ".join(" ".join(rng.choice(words) for words in parts) for _ in range(4))
        for _ in range(paragraphs)
    )
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp corpus file; token caches go to tmp; torch threads are restored afterwards."""
    monkeypatch.setenv("EBT_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield write_corpus(tmp_path / "corpus.txt")
    torch.set_num_threads(threads)


def four_step_run(run_dir: Path) -> list[str]:
    """train.* overrides of a 4-step CPU run that logs every step and evaluates every 2."""
    return [
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.log_every=1",
        "train.save_every=0",
        "train.progress=false",
        "train.num_threads=1",
        "train.device=cpu",
        f"train.out_dir={run_dir}",
    ]


@pytest.fixture
def restore_threads():
    """Torch's intra-op thread count is put back after a test that trains (num_threads=1)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
