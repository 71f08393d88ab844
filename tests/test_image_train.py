"""Images on the shared core: the image EBT (System 1 and 2, replay buffer included) and its DiT
twin train, evaluate and resume exactly through the same trainer as text: after a split run,
an interruption by SIGINT / SIGTERM, or a truncated newest checkpoint, the logged history is
step for step the uninterrupted run's."""

from __future__ import annotations

import json
import math
import signal

import pytest
from support import CONFIGS as ALL_CONFIGS
from support.text import interrupt_at, training_rows
from support.vision import IMAGE_SYSTEM2 as SYSTEM2
from support.vision import (
    evaluation_rows,
    events,
    image_config,
    recomputed_psnr,
    same_weights,
)

from ebt.checkpoint import load_train_state
from ebt.cli.main import main
from ebt.training.interrupt import TrainingInterrupted
from ebt.training.trainer import train

CONFIGS = ALL_CONFIGS / "image"
PSNR_TOLERANCE = 1e-5  # relative: float32 model outputs, PSNR recomputed in float64


@pytest.fixture(autouse=True)
def _threads(restore_threads):
    """Every test here trains on one thread; the count is restored afterwards."""


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("tiny.toml", []), ("tiny.toml", SYSTEM2), ("dit-tiny.toml", [])],
    ids=["ebt-s1", "ebt-s2", "dit"],
)
def test_image_models_train_and_evaluate(tmp_path, name, overrides):
    """The reported PSNR is the final model's denoised images' (recomputed outside evaluate,
    from the same seeded noise), not, e.g., the noisy input's."""
    result = train(image_config(tmp_path / "run", name, *overrides))
    assert result["split"] == "val" and result["images"] == 4 and result["noise_level"] == 0.1
    expected = recomputed_psnr(tmp_path / "run")
    assert result["psnr"] == pytest.approx(expected, rel=PSNR_TOLERANCE)
    assert result["psnr"] == pytest.approx(10 * math.log10(255.0**2 / result["mse"]), rel=1e-5)
    assert result["forward_passes"] == (
        100 if name == "dit-tiny.toml" else len(result["loss_per_step"])
    )
    assert [row["step"] for row in training_rows(tmp_path / "run")] == [1, 2, 3, 4]
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_image_replay_buffer_is_saved(tmp_path):
    train(image_config(tmp_path / "run", "tiny.toml", *SYSTEM2))
    replay = load_train_state(tmp_path / "run")["extra"]["replay"]
    assert replay["tokens"].shape == (16, 3, 8, 8) and replay["states"].shape == (16, 3, 8, 8)


@pytest.mark.parametrize("overrides", [[], SYSTEM2], ids=["s1", "s2"])
def test_image_resume_is_exact(tmp_path, overrides):
    """Stopped at step 2 and resumed: the checkpoint says step 2, the resume continues from it
    (one resume row at step 2), and steps 1..4 log the uninterrupted run's losses, learning
    rates and evaluations bit for bit (a restart from step 0 or a rewound data position does
    not)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    extra = ["train.schedule_steps=4", *overrides]
    train(image_config(whole, "tiny.toml", *extra))
    train(image_config(split, "tiny.toml", "train.max_steps=2", *extra))
    assert load_train_state(split)["step"] == 2
    train(image_config(split, "tiny.toml", *extra))
    assert [row["step"] for row in training_rows(split)] == [1, 2, 3, 4]
    assert training_rows(split) == training_rows(whole)
    assert evaluation_rows(split) == evaluation_rows(whole)
    assert [(row["event"], row["step"]) for row in events(split)] == [("resume", 2)]
    assert load_train_state(split)["step"] == 4 and same_weights(whole, split)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_at_the_step_and_resume_is_exact(tmp_path, monkeypatch, number):
    """A signal delivered after optimizer step 3 (System 2, replay buffer): the run stops at
    that step boundary with a checkpoint of step 3, and running again finishes as if
    uninterrupted."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(image_config(whole, "tiny.toml", *SYSTEM2))
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3, number)
        with pytest.raises(TrainingInterrupted) as caught:
            train(image_config(split, "tiny.toml", *SYSTEM2))
    assert caught.value.exit_code == 128 + number and signal.getsignal(signal.SIGINT) is handler
    assert load_train_state(split)["step"] == 3
    assert [row["step"] for row in training_rows(split)] == [1, 2, 3]
    train(image_config(split, "tiny.toml", *SYSTEM2))
    assert training_rows(split) == training_rows(whole)
    assert evaluation_rows(split) == evaluation_rows(whole)
    assert [(row["event"], row["step"]) for row in events(split)] == [
        ("interrupted", 3),
        ("resume", 3),
    ]
    assert same_weights(whole, split)


def test_resume_falls_back_from_a_truncated_checkpoint_exactly(tmp_path, capfd):
    """The newest checkpoint (step 4) cut in half: resume warns, starts from step 2 and ends
    with the uninterrupted 6-step run's history and weights."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    extra = ["train.save_every=2", "train.schedule_steps=6", *SYSTEM2]
    train(image_config(whole, "tiny.toml", *extra, "train.max_steps=6"))
    train(image_config(broken, "tiny.toml", *extra))
    latest = broken / "step_000004" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    capfd.readouterr()
    train(image_config(broken, "tiny.toml", *extra, "train.max_steps=6"))
    assert "step_000004 is unreadable" in capfd.readouterr().err
    assert [(row["event"], row["step"]) for row in events(broken)][-1] == ("resume", 2)
    assert [row["step"] for row in training_rows(broken)] == [1, 2, 3, 4, 5, 6]
    assert training_rows(broken) == training_rows(whole)
    assert evaluation_rows(broken) == evaluation_rows(whole)
    assert same_weights(whole, broken)


def test_eval_reports_both_noise_levels(tmp_path, capsys):
    train(image_config(tmp_path / "run"))
    capsys.readouterr()
    for split, level in (("val", 0.1), ("ood", 0.2)):
        assert main(["eval", str(tmp_path / "run"), "--split", split, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["noise_level"] == level and result["split"] == split
        assert result["forward_passes"] == 1  # one thinking step (DiT: timestep + 1)


def test_a_text_source_for_images_is_one_line(tmp_path, capsys):
    argv = ["train", str(CONFIGS / "tiny.toml"), f"train.out_dir={tmp_path / 'run'}"]
    assert main([*argv, "data.source=stdlib"]) == 2
    assert "is a text corpus" in capsys.readouterr().err
