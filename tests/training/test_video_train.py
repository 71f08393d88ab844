"""Video on the shared core: the video EBT (System 1 and 2, replay buffer included) and its
Transformer++ twin train, evaluate and resume exactly through the same trainer as text: after a
split run, an interruption by SIGINT / SIGTERM, or a truncated newest checkpoint, the logged
history is step for step the uninterrupted run's."""

from __future__ import annotations

import json

import pytest
from support import CONFIGS as ALL_CONFIGS
from support.text import training_rows
from support.vision import VIDEO_SYSTEM2 as SYSTEM2
from support.vision import (
    recomputed_psnr,
    video_config,
)

from ebt.checkpoint import load_train_state
from ebt.cli.main import main
from ebt.training.trainer import train

CONFIGS = ALL_CONFIGS / "video"
FRAMES, SIZE, BATCH = 4, 8, 4  # support.vision.VIDEO_SHRINK
PSNR_TOLERANCE = 1e-5  # relative: float32 model outputs, PSNR recomputed in float64


@pytest.fixture(autouse=True)
def _threads(restore_threads):
    """Every test here trains on one thread; the count is restored afterwards."""


@pytest.mark.parametrize(
    ("name", "overrides"),
    [  # ebt-s1: recomputed_psnr thinks on model.think's uniform schedule, so not the preset's
        # random step counts (evaluated on the paper's schedule: tests/thinking/test_thinking.py)
        ("tiny.toml", ["think.random_steps=0"]),
        ("tiny.toml", SYSTEM2),
        ("baseline-tiny.toml", []),
        ("frame-tiny.toml", []),
        ("frame-tiny.toml", SYSTEM2),
        ("frame-baseline-tiny.toml", []),
    ],
    ids=["ebt-s1", "ebt-s2", "transformer_pp", "frame-ebt-s1", "frame-ebt-s2", "frame-tpp"],
)
def test_video_models_train_and_evaluate(tmp_path, name, overrides):
    """The reported PSNR is the mean over predicted frames of the final model's predictions
    (recomputed outside evaluate, from the same seeded starts), not of its starting frames."""
    result = train(video_config(tmp_path / "run", name, *overrides))
    assert result["split"] == "val" and result["frames"] == BATCH * (FRAMES - 1)
    assert result["psnr"] == pytest.approx(recomputed_psnr(tmp_path / "run"), rel=PSNR_TOLERANCE)
    assert result["mse"] > 0 and result["loss"] > 0
    ebt = name in ("tiny.toml", "frame-tiny.toml")
    assert result["forward_passes"] == (len(result["loss_per_step"]) if ebt else 1)
    assert ("energy_per_step" in result) == ebt
    assert [row["step"] for row in training_rows(tmp_path / "run")] == [1, 2, 3, 4]
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_video_replay_buffer_holds_clips_and_frame_states(tmp_path):
    train(video_config(tmp_path / "run", "tiny.toml", *SYSTEM2))
    replay = load_train_state(tmp_path / "run")["extra"]["replay"]
    assert replay["tokens"].shape == (16, FRAMES, 3, SIZE, SIZE)  # 4 steps x 4 fresh clips
    assert replay["states"].shape == (16, FRAMES - 1, 3 * SIZE * SIZE)


def test_eval_json_in_and_out_of_distribution(tmp_path, capsys):
    train(video_config(tmp_path / "run"))
    capsys.readouterr()
    results = {}
    for split in ("val", "ood"):  # 3 passes: random step counts evaluate the last landscape R + 1
        assert main(["eval", str(tmp_path / "run"), "--split", split, "--json"]) == 0
        results[split] = json.loads(capsys.readouterr().out)
        assert results[split]["split"] == split and results[split]["forward_passes"] == 3
        assert {"loss", "psnr", "mse", "loss_per_step", "energy_per_step"} <= set(results[split])
    assert results["val"]["loss"] != results["ood"]["loss"]  # held-out photographs, 2x speed
    for override in (f"data.frame_size={SIZE * 2}", f"data.frames={FRAMES + 1}"):  # fixed
        assert main(["eval", str(tmp_path / "run"), override, "--json"]) == 2
        assert "does not match the checkpoint" in capsys.readouterr().err


def test_a_text_source_for_video_is_one_line(tmp_path, capsys):
    argv = ["train", str(CONFIGS / "tiny.toml"), f"train.out_dir={tmp_path / 'run'}"]
    assert main([*argv, "data.source=stdlib"]) == 2
    assert "is a text corpus" in capsys.readouterr().err
