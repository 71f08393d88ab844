"""One run loader for every modality (`ebt.load_run(path, modality=...)`) and the modality
units' class-level answers: a run of the wrong modality is refused in one line, by the library
and by every command that needs one modality, before anything is printed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.vision import image_config, video_config

import ebt
from ebt.cli.main import main
from ebt.config import BASELINES, load_config
from ebt.data.probes import SPECS
from ebt.errors import EbtError, WrongModalityError
from ebt.modalities import MODALITIES, ImageModality, TextModality, VideoModality, unit_for
from ebt.training.trainer import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained image run and video run (4 steps each)."""
    root, threads = tmp_path_factory.mktemp("runs"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(image_config(root / "image", "tiny.toml", "train.batch_size=2"))
        train(video_config(root / "video"))
    finally:
        torch.set_num_threads(threads)
    return {"image": root / "image", "video": root / "video"}


@pytest.mark.parametrize("modality", ["image", "video"])
@pytest.mark.parametrize("verb", [["think"], ["generate", "--prompt", "def "], ["think", "--json"]])
def test_text_commands_refuse_other_runs_in_one_line(runs, capsys, modality, verb):
    """Used to crash with a traceback ('NoneType' object has no attribute ...), `generate`
    after printing the prompt."""
    capsys.readouterr()
    assert main([verb[0], str(runs[modality]), *verb[1:]]) == 2
    out, err = capsys.readouterr()
    commands = {"image": "ebt denoise", "video": "ebt rollout"}[modality]
    assert out == "" and err.count("\n") == 1 and err.startswith("ebt: error: ")
    assert f"is an {modality} run" in err or f"is a {modality} run" in err
    assert f"ebt {verb[0]} needs a text run ({modality} runs: {commands})" in err


def test_probe_refuses_other_runs_in_one_line(runs, capsys):
    capsys.readouterr()
    assert main(["probe", next(iter(SPECS)), str(runs["image"])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "is an image run; ebt probe needs a text run (image runs: ebt denoise)" in err


def test_video_and_image_commands_refuse_each_others_runs(runs, capsys):
    capsys.readouterr()
    assert main(["denoise", str(runs["video"])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "is a video run; ebt denoise needs an image run (video runs: ebt rollout)" in err


def test_load_run_checks_the_modality_it_is_asked_for(runs):
    image = ebt.load_run(runs["image"], modality="image")
    assert image.config.model.modality == "image" and image.tokenizer is None
    assert ebt.load_run(runs["video"]).config.model.modality == "video"  # no modality: any
    assert isinstance(ebt.load(runs["video"]), torch.nn.Module)
    with pytest.raises(WrongModalityError, match="needs a video run") as error:
        ebt.load_run(runs["image"], modality="video", verb="my script")
    assert isinstance(error.value, EbtError) and "my script needs a video run" in str(error.value)
    with pytest.raises(ValueError, match="modality='audio'"):
        ebt.load_run(runs["image"], modality="audio")


def test_units_answer_what_modules_outside_modalities_used_to_switch_on():
    """The facts bench, scaling, axes and the run loader read from the unit, as they were."""
    tiny_config = load_config(None)  # the default: text
    assert [MODALITIES[name] for name in ("text", "image", "video")] == [
        TextModality,
        ImageModality,
        VideoModality,
    ]
    assert {name: unit.baseline_kind() for name, unit in MODALITIES.items()} == BASELINES
    assert {name: unit.default_metric for name, unit in MODALITIES.items()} == {
        "text": "ppl",
        "image": "psnr",
        "video": "loss",
    }
    assert unit_for(tiny_config) is TextModality and tiny_config.data.seq_len > 1
    assert TextModality.units_per_example(tiny_config) == tiny_config.data.seq_len
    assert (
        ImageModality.units_per_example(tiny_config)
        == VideoModality.units_per_example(tiny_config)
        == 1
    )
    assert [unit.generates_tokens for unit in MODALITIES.values()] == [True, False, False]


def test_example_batches_have_each_modalitys_shape(tmp_path):
    cpu = torch.device("cpu")
    image = image_config(tmp_path / "image")
    images = ImageModality.example_batch(image, 0, cpu)
    assert images.shape == (4, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    video = video_config(tmp_path / "video")
    assert VideoModality.example_batch(video, 0, cpu).shape == (4, 4, 3 * 8 * 8)
    assert VideoModality.shape_keys(video) == {"frames": 4, "frame_dim": 192}
    assert set(ImageModality.shape_keys(image)) == {"image_size", "noise_level", "diffusion_steps"}
