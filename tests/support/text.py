"""The tiny text setup most training tests share: the preset, its shrunk overrides, a corpus."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import torch

import ebt.models.candidate_gradient as candidate_gradient
from ebt.config import Config, load_config
from ebt.training.tracking import read_metrics
from ebt.training.trainer import Trainer
from support import CONFIGS

TINY = CONFIGS / "text" / "tiny.toml"
VOCAB = 257
SYSTEM2 = [
    "think.landscapes=1",
    "think.step_size=5",
    "think.step_size_learnable=false",
    "think.step_size_random_scale=2",
    "think.random_steps=2",
    "think.random_steps_min=2",
    "think.langevin_noise=3",
    "think.replay_buffer=true",
    "think.truncate=true",
    "think.detach=false",
]
RECIPES = {"s1": ["model.variant=pred_step"], "s2": SYSTEM2}


def tiny_config(run_dir: Path, corpus: Path, *overrides: str) -> Config:
    """configs/text/tiny.toml shrunk to a 1-layer width-32 model on `corpus`, CPU, 6 steps."""
    return load_config(TINY, tiny_overrides(run_dir, corpus) + list(overrides))


def tiny_overrides(run_dir: Path, corpus: Path) -> list[str]:
    """The overrides of tiny_config (for commands that take them as arguments)."""
    return [
        f"data.source={corpus}",
        "data.seq_len=16",
        "data.val_fraction=0.1",
        "model.dim=32",
        "model.layers=1",
        "model.heads=2",
        "train.batch_size=4",
        "train.max_steps=6",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.log_every=1",
        "train.save_every=0",
        "train.progress=false",
        "train.num_threads=1",
        "train.device=cpu",
        f"train.out_dir={run_dir}",
    ]


def training_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl training rows (not evaluation or event rows) without the wall clock."""
    rows = [row for row in read_metrics(run_dir) if "split" not in row and "event" not in row]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


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


def interrupt_at(
    monkeypatch: pytest.MonkeyPatch, step: int, number: int = signal.SIGINT, run: str = ""
) -> None:
    """Deliver a real signal to this process when a trainer (of the run directory named `run`,
    if given) finishes optimizer step `step`: a Ctrl-C at a known step, no clock involved."""
    original = Trainer.train_step

    def train_step(self: Trainer) -> dict:
        row = original(self)
        if self.step == step and (not run or self.run_dir.name == run):
            os.kill(os.getpid(), number)
        return row

    monkeypatch.setattr(Trainer, "train_step", train_step)


def written_out_calls(
    monkeypatch: pytest.MonkeyPatch, name: str = "energies_and_gradient"
) -> list[str]:
    """Records every call of a hand-written pass of ebt.models.candidate_gradient (default the
    candidate gradient; "extend_context_by_one": generation's one-token context pass): "graph"
    when autograd records it (training), "inference" otherwise. Tests comparing it with
    autograd assert it ran (its gate, EnergyTransformer.hand_written_path, could send both
    sides to autograd)."""
    calls: list[str] = []
    original = getattr(candidate_gradient, name)

    def recording(*args, **kwargs):
        calls.append("graph" if torch.is_grad_enabled() else "inference")
        return original(*args, **kwargs)

    monkeypatch.setattr(candidate_gradient, name, recording)
    return calls
