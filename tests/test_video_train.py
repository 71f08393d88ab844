"""Video on the shared core: the video EBT (System 1 and 2, replay buffer included) and its
Transformer++ twin train, evaluate and resume exactly through the same trainer as text: after a
split run, an interruption by SIGINT / SIGTERM, or a truncated newest checkpoint, the logged
history is step for step the uninterrupted run's."""

from __future__ import annotations

import json
import signal

import pytest
from support import CONFIGS as ALL_CONFIGS
from support.text import interrupt_at, training_rows
from support.vision import VIDEO_SYSTEM2 as SYSTEM2
from support.vision import (
    evaluation_rows,
    events,
    recomputed_psnr,
    same_weights,
    video_config,
)

from ebt.checkpoint import load_train_state
from ebt.cli.main import main
from ebt.training.interrupt import TrainingInterrupted
from ebt.training.trainer import train

CONFIGS = ALL_CONFIGS / "video"
FRAMES, SIZE, BATCH = 4, 8, 4  # support.vision.VIDEO_SHRINK
PSNR_TOLERANCE = 1e-5  # relative: float32 model outputs, PSNR recomputed in float64


@pytest.fixture(autouse=True)
def _threads(restore_threads):
    """Every test here trains on one thread; the count is restored afterwards."""


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("tiny.toml", []), ("tiny.toml", SYSTEM2), ("baseline-tiny.toml", [])],
    ids=["ebt-s1", "ebt-s2", "transformer_pp"],
)
def test_video_models_train_and_evaluate(tmp_path, name, overrides):
    """The reported PSNR is the mean over predicted frames of the final model's predictions
    (recomputed outside evaluate, from the same seeded starts), not of its starting frames."""
    result = train(video_config(tmp_path / "run", name, *overrides))
    assert result["split"] == "val" and result["frames"] == BATCH * (FRAMES - 1)
    assert result["psnr"] == pytest.approx(recomputed_psnr(tmp_path / "run"), rel=PSNR_TOLERANCE)
    assert result["mse"] > 0 and result["loss"] > 0
    ebt = name == "tiny.toml"
    assert result["forward_passes"] == (len(result["loss_per_step"]) if ebt else 1)
    assert ("energy_per_step" in result) == ebt
    assert [row["step"] for row in training_rows(tmp_path / "run")] == [1, 2, 3, 4]
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_video_replay_buffer_holds_clips_and_frame_states(tmp_path):
    train(video_config(tmp_path / "run", "tiny.toml", *SYSTEM2))
    replay = load_train_state(tmp_path / "run")["extra"]["replay"]
    assert replay["tokens"].shape == (16, FRAMES, 3, SIZE, SIZE)  # 4 steps x 4 fresh clips
    assert replay["states"].shape == (16, FRAMES - 1, 3 * SIZE * SIZE)


@pytest.mark.parametrize("overrides", [[], SYSTEM2], ids=["s1", "s2"])
def test_video_resume_is_exact(tmp_path, overrides):
    """Stopped at step 2 and resumed: the checkpoint says step 2, the resume continues from it
    (one resume row at step 2), and steps 1..4 log the uninterrupted run's losses, learning
    rates and evaluations bit for bit (a restart from step 0 or a rewound data position does
    not)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    extra = ["train.schedule_steps=4", *overrides]
    train(video_config(whole, "tiny.toml", *extra))
    train(video_config(split, "tiny.toml", "train.max_steps=2", *extra))
    assert load_train_state(split)["step"] == 2
    train(video_config(split, "tiny.toml", *extra))
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
    train(video_config(whole, "tiny.toml", *SYSTEM2))
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3, number)
        with pytest.raises(TrainingInterrupted) as caught:
            train(video_config(split, "tiny.toml", *SYSTEM2))
    assert caught.value.exit_code == 128 + number and signal.getsignal(signal.SIGINT) is handler
    assert load_train_state(split)["step"] == 3
    assert [row["step"] for row in training_rows(split)] == [1, 2, 3]
    train(video_config(split, "tiny.toml", *SYSTEM2))
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
    train(video_config(whole, "tiny.toml", *extra, "train.max_steps=6"))
    train(video_config(broken, "tiny.toml", *extra))
    latest = broken / "step_000004" / "train_state.pt"  # the images' test cuts the weights
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    capfd.readouterr()
    train(video_config(broken, "tiny.toml", *extra, "train.max_steps=6"))
    assert "step_000004 is unreadable" in capfd.readouterr().err
    assert [(row["event"], row["step"]) for row in events(broken)][-1] == ("resume", 2)
    assert [row["step"] for row in training_rows(broken)] == [1, 2, 3, 4, 5, 6]
    assert training_rows(broken) == training_rows(whole)
    assert evaluation_rows(broken) == evaluation_rows(whole)
    assert same_weights(whole, broken)


def test_eval_json_in_and_out_of_distribution(tmp_path, capsys):
    train(video_config(tmp_path / "run"))
    capsys.readouterr()
    results = {}
    for split in ("val", "ood"):
        assert main(["eval", str(tmp_path / "run"), "--split", split, "--json"]) == 0
        results[split] = json.loads(capsys.readouterr().out)
        assert results[split]["split"] == split and results[split]["forward_passes"] == 2
        assert {"loss", "psnr", "mse", "loss_per_step", "energy_per_step"} <= set(results[split])
    assert results["val"]["loss"] != results["ood"]["loss"]  # held-out photographs, 2x speed
    for override in (f"data.frame_size={SIZE * 2}", f"data.frames={FRAMES + 1}"):  # fixed
        assert main(["eval", str(tmp_path / "run"), override, "--json"]) == 2
        assert "does not match the checkpoint" in capsys.readouterr().err


def test_a_text_source_for_video_is_one_line(tmp_path, capsys):
    argv = ["train", str(CONFIGS / "tiny.toml"), f"train.out_dir={tmp_path / 'run'}"]
    assert main([*argv, "data.source=stdlib"]) == 2
    assert "is a text corpus" in capsys.readouterr().err
