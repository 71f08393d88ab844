"""Video and the paper's code: `ebt import-reference` / `export-reference` of its video EBT and
Transformer++ checkpoints (../shared/vectors/video_ebt_time_embed), without the frozen frame
encoder, and the paper-script presets (configs/video/paper-*.toml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import ROOT, VECTORS
from support.tolerances import relative

import ebt
from ebt.checkpoint import save_checkpoint, write_run_config
from ebt.cli.main import main
from ebt.config import load_config
from ebt.interop.convert import read_reference_checkpoint
from ebt.models import build_model, frame_dim

TOLERANCE = 1e-4  # relative to the largest expected magnitude
CONFIGS = ROOT / "configs" / "video"
PAPER_LATENTS = [  # SD-VAE latents of 224 x 224 frames: the only frames the paper's code reads
    "data.frame_encoder=vae",
    "data.frame_size=224",
    "data.frames=5",
    "model.dim=16",
    "model.layers=1",
    "model.heads=2",
    "train.batch_size=2",
    "train.num_threads=1",
    "train.device=cpu",
]
S2 = [
    "think.landscapes=1",
    "think.step_size_learnable=false",
    "think.step_size_random_scale=2",
    "think.random_steps=2",
    "think.random_steps_min=2",
    "think.langevin_noise=1",
    "think.replay_buffer=true",
    "think.truncate=true",
    "think.detach=false",
    "data.vae_scaling=0.18215",
]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def paper_video(vectors_dir: Path) -> dict:
    folder = VECTORS / "video_ebt_time_embed"
    return {
        "checkpoint": torch.load(folder / "ref.ckpt", weights_only=True),
        "expected": torch.load(folder / "expected.pt", weights_only=True),
    }


def _import(checkpoint: dict, tmp_path: Path, name: str = "run") -> Path:
    torch.save(checkpoint, tmp_path / f"{name}.ckpt")
    assert main(["import-reference", str(tmp_path / f"{name}.ckpt"), str(tmp_path / name)]) == 0
    return tmp_path / name


def test_the_imported_video_ebt_thinks_as_the_papers_code(paper_video, tmp_path, capsys):
    run = ebt.load_run(_import(paper_video["checkpoint"], tmp_path))
    assert "video EBT (time_embed)" in capsys.readouterr().out
    config, expected = run.config, paper_video["expected"]
    assert (config.model.modality, config.model.kind, config.data.frame_encoder) == (
        "video",
        "ebt",
        "vae",
    )
    assert frame_dim(config) == 3136 and config.data.frames == 8  # context_length
    assert (config.think.landscapes, config.think.step_size) == (2, 30.0)
    # the paper's loaders read context_length frames a clip (7 predictions); the vectors fed one
    # more, and causality makes the first 7 predictions independent of it
    context = expected["latents"][:, :7]  # (B, 7, 3136)
    trajectory = run.model.think(context, init=expected["init"][:, :7])
    for ours, theirs in zip(trajectory.states, expected["states"], strict=True):
        assert relative(ours, theirs[:, :7]) < TOLERANCE
    for ours, theirs in zip(trajectory.energies, expected["energies"], strict=True):
        assert relative(ours, theirs[:, :7]) < TOLERANCE


def test_the_papers_frozen_vae_is_left_out(paper_video, tmp_path):
    checkpoint = dict(paper_video["checkpoint"])
    vae = {"model.image_encoder.encoder.conv_in.weight": torch.randn(8, 3, 3, 3)}
    checkpoint["state_dict"] = {**checkpoint["state_dict"], **vae}
    state = ebt.load_run(_import(checkpoint, tmp_path)).model.state_dict()
    assert not any("image_encoder" in key for key in state)
    assert main(["export-reference", str(tmp_path / "run"), str(tmp_path / "x.ckpt")]) == 0
    exported = read_reference_checkpoint(tmp_path / "x.ckpt")["state_dict"]
    assert not any("image_encoder" in key for key in exported)
    assert set(exported) == set(paper_video["checkpoint"]["state_dict"])


def _our_run(path: Path, overrides: list[str]) -> Path:
    config = load_config(CONFIGS / "frame-tiny.toml", [*PAPER_LATENTS, *overrides])
    model = build_model(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name not in ("step_size", "langevin_std"):
                parameter.normal_(0.0, 0.05)
    save_checkpoint(path, 7, model, config.to_dict(), None, None)
    write_run_config(path, config.to_dict())
    return path


@pytest.mark.parametrize(
    "overrides",
    [[], S2, ["model.kind=transformer_pp"], ["model.variant=adaln"]],
    ids=["ebt-s1", "ebt-s2", "transformer_pp", "adaln"],
)
def test_export_then_import_is_the_same_model(tmp_path, capsys, overrides):
    ours = _our_run(tmp_path / "ours", overrides)
    assert main(["export-reference", str(ours), str(tmp_path / "x.ckpt")]) == 0
    assert "without its frozen VAE" in capsys.readouterr().out
    exported = read_reference_checkpoint(tmp_path / "x.ckpt")
    hparams = exported["hyper_parameters"]
    assert (hparams["modality"], hparams["context_length"], hparams["backbone_type"]) == (
        "VID",
        5,
        "vae",
    )
    assert hparams["sdxl_vae_standardization"] == (overrides == S2)
    assert not any("image_encoder" in key for key in exported["state_dict"])
    assert exported["global_step"] == 7
    assert main(["import-reference", str(tmp_path / "x.ckpt"), str(tmp_path / "back")]) == 0
    first, second = ebt.load_run(ours), ebt.load_run(tmp_path / "back")
    assert first.config.model == second.config.model
    for key in ("frames", "frame_size", "frame_encoder", "vae", "vae_scaling"):
        assert getattr(first.config.data, key) == getattr(second.config.data, key), key
    assert frame_dim(second.config) == 3136
    if first.config.model.kind == "ebt":
        assert first.config.think == second.config.think
    assert list(first.model.state_dict()) == list(second.model.state_dict())
    for key, tensor in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], tensor), key
    frames = torch.randn(2, 5, 3136)  # (B, T, frame_dim) latents
    if first.config.model.kind == "ebt":
        context, candidates = frames[:, :-1], torch.randn(2, 4, 3136)
        energies = [
            run.model.energies(run.model.encode_context(context, 0), candidates, None, 0)
            for run in (first, second)
        ]
        assert torch.equal(energies[0], energies[1])
    else:
        assert torch.equal(first.model(frames), second.model(frames))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["data.frame_encoder=pixels", "data.frame_size=16"], "data.frame_encoder=vae"),
        (["data.vae_scaling=0.5"], "data.vae_scaling=0.5"),
    ],
)
def test_export_refuses_frames_the_papers_video_code_cannot_read(
    tmp_path, capsys, overrides, named
):
    ours = _our_run(tmp_path / "ours", overrides)
    assert main(["export-reference", str(ours), str(tmp_path / "x.ckpt")]) == 2
    error = capsys.readouterr().err.strip()
    assert named in error and len(error.splitlines()) == 1
    assert not (tmp_path / "x.ckpt").exists()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"backbone_type": "dinov2"}, "backbone_type"),
        ({"energy_loss_coeff": 0.5}, "energy_loss_coeff"),
        ({"model_name": "baseline_transformer"}, "model_name"),
        ({"denoising_initial_condition": "other"}, "denoising_initial_condition"),
    ],
)
def test_unsupported_video_flags_are_refused_by_name(paper_video, tmp_path, capsys, change, named):
    checkpoint = dict(paper_video["checkpoint"])
    checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], **change}
    torch.save(checkpoint, tmp_path / "paper.ckpt")
    assert main(["import-reference", str(tmp_path / "paper.ckpt"), str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert named in error and len(error.splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "kind", "lr"),
    [
        ("paper-s1", "ebt", 4e-4),
        ("paper-s2", "ebt", 4e-4),
        ("paper-baseline", "transformer_pp", 1.2e-3),
    ],
)
def test_paper_presets_load_build_and_export(tmp_path, name, kind, lr):
    config = load_config(CONFIGS / f"{name}.toml")
    model, data, train = config.model, config.data, config.train
    assert (model.modality, model.kind, model.dim, model.layers, model.heads) == (
        "video",
        kind,
        384,
        6,
        6,
    )
    assert (data.frames, data.frame_size, data.frame_encoder, frame_dim(config)) == (
        16,
        224,
        "vae",
        3136,
    )
    assert data.vae == "stabilityai/sd-vae-ft-mse"
    assert (train.lr, train.min_lr_ratio, train.warmup_steps, train.grad_clip) == (
        lr,
        0.1,
        10000,
        1.0,
    )
    small = ["model.dim=16", "model.layers=1", "model.heads=2", "train.device=cpu"]
    config = load_config(CONFIGS / f"{name}.toml", small)
    save_checkpoint(tmp_path / "run", 0, build_model(config), config.to_dict(), None, None)
    write_run_config(tmp_path / "run", config.to_dict())
    assert main(["export-reference", str(tmp_path / "run"), str(tmp_path / "x.ckpt")]) == 0
    hparams = read_reference_checkpoint(tmp_path / "x.ckpt")["hyper_parameters"]
    assert hparams["context_length"] == 16 and hparams["modality"] == "VID"


def test_paper_s1_and_s2_presets_are_the_scripts_recipes():
    s1 = load_config(CONFIGS / "paper-s1.toml")
    think = s1.think
    assert (think.landscapes, think.steps, think.step_size, think.step_size_learnable) == (
        2,
        1,
        30000.0,
        True,
    )
    assert think.step_size_lr_multiplier == 90000.0 and s1.data.vae_scaling == 1.0
    assert (s1.train.batch_size, s1.train.grad_accum, s1.train.max_steps) == (16, 4, 100000)
    s2 = load_config(CONFIGS / "paper-s2.toml")
    think = s2.think
    assert (think.landscapes, think.step_size, think.step_size_learnable) == (1, 3000.0, False)
    assert (think.step_size_random_scale, think.random_steps, think.random_steps_min) == (2, 2, 2)
    assert think.replay_buffer and think.truncate and not think.detach
    assert think.langevin_noise == 1.0 and s2.data.vae_scaling == 0.18215
    assert (s2.train.batch_size, s2.train.grad_accum, s2.train.max_steps) == (32, 2, 60000)
