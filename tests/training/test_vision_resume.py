"""Image and video runs on the shared trainer: exact resume, a signal at a step boundary, and the
fallback from a truncated checkpoint, checked step by step against an uninterrupted run."""

from __future__ import annotations

import signal

import pytest
from support.text import interrupt_at, training_rows
from support.vision import (
    VISION_SYSTEM2,
    evaluation_rows,
    events,
    same_weights,
    vision_config,
)

from ebt.checkpoint import load_train_state
from ebt.training.interrupt import TrainingInterrupted
from ebt.training.trainer import train

KINDS = ["image", "video"]


@pytest.fixture(autouse=True)
def _threads(restore_threads):
    """Every test here trains on one thread; the count is restored afterwards."""


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recipe", ["s1", "s2"])
def test_resume_is_exact(tmp_path, kind, recipe):
    """Stopped at step 2 and resumed: the checkpoint says step 2, the resume continues from it
    (one resume row at step 2), and steps 1..4 log the uninterrupted run's losses, learning
    rates and evaluations bit for bit (a restart from step 0 or a rewound data position does
    not)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    extra = ["train.schedule_steps=4", *(VISION_SYSTEM2[kind] if recipe == "s2" else [])]
    train(vision_config(kind, whole, *extra))
    train(vision_config(kind, split, "train.max_steps=2", *extra))
    assert load_train_state(split)["step"] == 2
    train(vision_config(kind, split, *extra))
    assert [row["step"] for row in training_rows(split)] == [1, 2, 3, 4]
    assert training_rows(split) == training_rows(whole)
    assert evaluation_rows(split) == evaluation_rows(whole)
    assert [(row["event"], row["step"]) for row in events(split)] == [("resume", 2)]
    assert load_train_state(split)["step"] == 4 and same_weights(whole, split)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_signal_saves_at_the_step_and_resume_is_exact(tmp_path, monkeypatch, kind, number):
    """A signal delivered after optimizer step 3 (System 2, replay buffer): the run stops at
    that step boundary with a checkpoint of step 3, and running again finishes as if
    uninterrupted."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(vision_config(kind, whole, *VISION_SYSTEM2[kind]))
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3, number)
        with pytest.raises(TrainingInterrupted) as caught:
            train(vision_config(kind, split, *VISION_SYSTEM2[kind]))
    assert caught.value.exit_code == 128 + number and signal.getsignal(signal.SIGINT) is handler
    assert load_train_state(split)["step"] == 3
    assert [row["step"] for row in training_rows(split)] == [1, 2, 3]
    train(vision_config(kind, split, *VISION_SYSTEM2[kind]))
    assert training_rows(split) == training_rows(whole)
    assert evaluation_rows(split) == evaluation_rows(whole)
    assert [(row["event"], row["step"]) for row in events(split)] == [
        ("interrupted", 3),
        ("resume", 3),
    ]
    assert same_weights(whole, split)


@pytest.mark.parametrize(
    ("kind", "cut"), [("image", "model.safetensors"), ("video", "train_state.pt")]
)
def test_resume_falls_back_from_a_truncated_checkpoint_exactly(tmp_path, capfd, kind, cut):
    """The newest checkpoint (step 4) cut in half: resume warns, starts from step 2 and ends
    with the uninterrupted 6-step run's history and weights."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    extra = ["train.save_every=2", "train.schedule_steps=6", *VISION_SYSTEM2[kind]]
    train(vision_config(kind, whole, *extra, "train.max_steps=6"))
    train(vision_config(kind, broken, *extra))
    latest = broken / "step_000004" / cut
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    capfd.readouterr()
    train(vision_config(kind, broken, *extra, "train.max_steps=6"))
    assert "step_000004 is unreadable" in capfd.readouterr().err
    assert [(row["event"], row["step"]) for row in events(broken)][-1] == ("resume", 2)
    assert [row["step"] for row in training_rows(broken)] == [1, 2, 3, 4, 5, 6]
    assert training_rows(broken) == training_rows(whole)
    assert evaluation_rows(broken) == evaluation_rows(whole)
    assert same_weights(whole, broken)
