"""Images on the shared core: the image EBT (System 1 and 2, replay buffer included) and its DiT
twin train, evaluate and resume exactly through the same trainer as text."""

from __future__ import annotations

import json

import pytest
import torch
from support import CONFIGS as ALL_CONFIGS
from support.vision import IMAGE_SYSTEM2 as SYSTEM2
from support.vision import image_config

from ebt.checkpoint import load_model_state, load_train_state
from ebt.cli import main
from ebt.tracking import read_metrics
from ebt.train import train

CONFIGS = ALL_CONFIGS / "image"


@pytest.fixture(autouse=True)
def _threads(restore_threads):
    """Every test here trains on one thread; the count is restored afterwards."""


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("tiny.toml", []), ("tiny.toml", SYSTEM2), ("dit-tiny.toml", [])],
    ids=["ebt-s1", "ebt-s2", "dit"],
)
def test_image_models_train_and_evaluate(tmp_path, name, overrides):
    result = train(image_config(tmp_path / "run", name, *overrides))
    assert result["split"] == "val" and result["images"] == 4 and result["noise_level"] == 0.1
    assert 5 < result["psnr"] < 60 and result["mse"] > 0
    assert result["forward_passes"] == (
        100 if name == "dit-tiny.toml" else len(result["loss_per_step"])
    )
    rows = [row for row in read_metrics(tmp_path / "run") if "split" not in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_image_replay_buffer_is_saved(tmp_path):
    train(image_config(tmp_path / "run", "tiny.toml", *SYSTEM2))
    replay = load_train_state(tmp_path / "run")["extra"]["replay"]
    assert replay["tokens"].shape == (16, 3, 8, 8) and replay["states"].shape == (16, 3, 8, 8)


@pytest.mark.parametrize("overrides", [[], SYSTEM2], ids=["s1", "s2"])
def test_image_resume_is_exact(tmp_path, overrides):
    extra = ["train.schedule_steps=4", *overrides]
    train(image_config(tmp_path / "whole", "tiny.toml", *extra))
    train(image_config(tmp_path / "split", "tiny.toml", "train.max_steps=2", *extra))
    train(image_config(tmp_path / "split", "tiny.toml", *extra))
    whole, _ = load_model_state(tmp_path / "whole")
    split, _ = load_model_state(tmp_path / "split")
    assert all(torch.equal(whole[name], split[name]) for name in whole)


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
