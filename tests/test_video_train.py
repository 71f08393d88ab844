"""Video on the shared core: the video EBT (System 1 and 2, replay buffer included) and its
Transformer++ twin train, evaluate and resume exactly through the same trainer as text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.text import four_step_run

from ebt.checkpoint import load_model_state, load_train_state
from ebt.cli import main
from ebt.config import load_config
from ebt.tracking import read_metrics
from ebt.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "video"
SYSTEM2 = [
    "think.landscapes=1",
    "think.step_size_learnable=false",
    "think.step_size_random_scale=2",
    "think.random_steps=1",
    "think.random_steps_min=2",
    "think.langevin_noise=0.01",
    "think.replay_buffer=true",
    "think.truncate=true",
    "think.detach=false",
]
FRAMES, SIZE, BATCH = 4, 8, 4


def video_config(run_dir: Path, name: str = "tiny.toml", *overrides: str):
    """A configs/video preset shrunk to 4 frames of 8 x 8, width 16, one block, 4 steps."""
    base = [
        f"data.frames={FRAMES}",
        f"data.frame_size={SIZE}",
        "model.dim=16",
        "model.layers=1",
        "model.heads=2",
        f"train.batch_size={BATCH}",
    ]
    return load_config(CONFIGS / name, base + four_step_run(run_dir) + list(overrides))


@pytest.fixture(autouse=True)
def _threads(restore_threads):
    """Every test here trains on one thread; the count is restored afterwards."""


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("tiny.toml", []), ("tiny.toml", SYSTEM2), ("baseline-tiny.toml", [])],
    ids=["ebt-s1", "ebt-s2", "transformer_pp"],
)
def test_video_models_train_and_evaluate(tmp_path, name, overrides):
    result = train(video_config(tmp_path / "run", name, *overrides))
    assert result["split"] == "val" and result["frames"] == BATCH * (FRAMES - 1)
    assert 0 < result["psnr"] < 60 and result["mse"] > 0 and result["loss"] > 0
    ebt = name == "tiny.toml"
    assert result["forward_passes"] == (len(result["loss_per_step"]) if ebt else 1)
    assert ("energy_per_step" in result) == ebt
    rows = [row for row in read_metrics(tmp_path / "run") if "split" not in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_video_replay_buffer_holds_clips_and_frame_states(tmp_path):
    train(video_config(tmp_path / "run", "tiny.toml", *SYSTEM2))
    replay = load_train_state(tmp_path / "run")["extra"]["replay"]
    assert replay["tokens"].shape == (16, FRAMES, 3, SIZE, SIZE)  # 4 steps x 4 fresh clips
    assert replay["states"].shape == (16, FRAMES - 1, 3 * SIZE * SIZE)


@pytest.mark.parametrize("overrides", [[], SYSTEM2], ids=["s1", "s2"])
def test_video_resume_is_exact(tmp_path, overrides):
    extra = ["train.schedule_steps=4", *overrides]
    train(video_config(tmp_path / "whole", "tiny.toml", *extra))
    train(video_config(tmp_path / "split", "tiny.toml", "train.max_steps=2", *extra))
    train(video_config(tmp_path / "split", "tiny.toml", *extra))
    whole, _ = load_model_state(tmp_path / "whole")
    split, _ = load_model_state(tmp_path / "split")
    assert all(torch.equal(whole[name], split[name]) for name in whole)


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
