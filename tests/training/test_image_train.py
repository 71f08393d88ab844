"""Images on the shared core: the image EBT (System 1 and 2, replay buffer included) and its DiT
twin train, evaluate and resume exactly through the same trainer as text: after a split run,
an interruption by SIGINT / SIGTERM, or a truncated newest checkpoint, the logged history is
step for step the uninterrupted run's."""

from __future__ import annotations

import json
import math

import pytest
from support import CONFIGS as ALL_CONFIGS
from support.text import training_rows
from support.vision import IMAGE_SYSTEM2 as SYSTEM2
from support.vision import (
    image_config,
    recomputed_psnr,
)

from ebt.checkpoint import load_train_state
from ebt.cli.main import main
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
