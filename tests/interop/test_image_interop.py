"""Images and the paper's code: `ebt import-reference` / `export-reference` for its denoising EBT
and DiT checkpoints (../shared/vectors/image_ebt, image_dit), the paper-script presets
(configs/image/paper-*.toml) and `ebt bench` on image configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import ROOT, VECTORS
from support.tolerances import relative
from support.vision import IMAGE_SHRINK

import ebt
from ebt.checkpoint import save_checkpoint, write_run_config
from ebt.cli.main import main
from ebt.config import load_config
from ebt.interop.convert import read_reference_checkpoint
from ebt.interop.image_reference import image_our_key
from ebt.modalities import modality_for
from ebt.models import build_model
from ebt.training.objective import Objective

TOLERANCE = 1e-4  # relative to the largest expected magnitude
CONFIGS = ROOT / "configs" / "image"
TINY_IMAGE = [*IMAGE_SHRINK, "model.patch_size=2", "train.batch_size=2"]  # 16 patches
TINY_IMAGE += ["train.num_threads=1", "train.device=cpu"]
pytestmark = pytest.mark.usefixtures("one_thread")


def expected_of(name: str) -> dict:
    return torch.load(VECTORS / name / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, vectors_dir: Path) -> dict[str, Path]:
    """image_ebt and image_dit's ref.ckpt imported through `ebt import-reference`."""
    root = tmp_path_factory.mktemp("image-interop")
    runs = {}
    for name in ("image_ebt", "image_dit"):
        argv = ["import-reference", str(VECTORS / name / "ref.ckpt"), str(root / name)]
        assert main(argv) == 0
        runs[name] = root / name
    return runs


def test_imported_configs_carry_the_papers_hyper_parameters(imported, capsys):
    config = ebt.load_run(imported["image_ebt"]).config
    model, data, think = config.model, config.data, config.think
    assert (model.modality, model.kind, model.dim, model.layers, model.heads) == (
        "image",
        "ebt",
        32,
        2,
        2,
    )
    assert (model.patch_size, model.ffn_dim, data.image_size) == (2, 0, 8)
    assert (data.noise_level, data.ood_noise_level, data.diffusion_steps) == (0.1, 0.2, 100)
    assert (think.landscapes, think.steps, think.step_size, think.step_size_learnable) == (
        2,
        1,
        60.0,
        True,
    )
    assert think.detach and not think.truncate and think.langevin_noise == 0.0
    dit = ebt.load_run(imported["image_dit"]).config
    assert (dit.model.modality, dit.model.kind, dit.model.patch_size) == ("image", "dit", 2)
    assert not (imported["image_ebt"] / "tokenizer").exists()


@pytest.mark.parametrize("name", ["image_ebt", "image_dit"])
def test_imported_runs_evaluate_offline(imported, name, capsys):
    assert main(["eval", str(imported[name]), "--batches", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["noise_level"] == 0.1 and result["psnr"] > 0
    assert result["forward_passes"] == (2 if name == "image_ebt" else 100)


def test_imported_image_ebt_thinks_and_trains_like_the_paper(imported):
    """Thinking states and energies at inference, then the training loss and every
    second-order gradient with the imported think config (2 steps, learnable alpha)."""
    expected = expected_of("image_ebt")
    run = ebt.load_run(imported["image_ebt"])
    trajectory = run.model.think(expected["noisy"])  # 2 landscapes of 1 step, as imported
    assert len(trajectory.states) == len(expected["states"]) == 2
    for k in range(2):
        assert relative(trajectory.states[k], expected["states"][k]) <= TOLERANCE
        assert relative(trajectory.energies[k], expected["energies"][k]) <= TOLERANCE
    task = modality_for(run.config).task("train")
    assert task.timestep == int(expected["timestep"][0])
    task.initial_state = lambda *args: expected["noisy"].clone()  # the paper's noised images
    output = Objective(run.model.train(), run.config.think, task=task)(expected["clean"])
    assert relative(output.loss, expected["train_loss"]) <= TOLERANCE
    assert relative(output.metrics["final_step_loss"], expected["train_final_loss"]) <= TOLERANCE
    output.loss.backward()
    parameters = dict(run.model.named_parameters())
    for key, gradient in expected["train_grads"].items():
        assert relative(parameters[image_our_key(key)].grad, gradient) <= TOLERANCE, key


def test_imported_dit_matches_the_papers_output_loss_and_ddim_chain(imported):
    expected = expected_of("image_dit")
    run = ebt.load_run(imported["image_dit"])
    clean, timesteps = expected["clean"], expected["train_timesteps"]
    assert relative(run.model(clean, timesteps), expected["output"]) <= TOLERANCE
    diffusion = modality_for(run.config).task("val").diffusion
    assert relative(diffusion.alphas_cumprod, expected["alphas_cumprod"]) <= 1e-12
    terms = diffusion.training_losses(run.model, clean, timesteps, expected["noise"])
    assert relative(terms.loss.mean(), expected["train_loss"]) <= TOLERANCE
    terms.loss.mean().backward()
    parameters = dict(run.model.named_parameters())
    for key, gradient in expected["train_grads"].items():
        assert relative(parameters[image_our_key(key)].grad, gradient) <= TOLERANCE, key
    start = int(expected["ddim_start_timestep"])
    denoised = diffusion.ddim(run.model, expected["ddim_noisy"], start)
    assert relative(denoised, expected["ddim_denoised"]) <= TOLERANCE


@pytest.mark.parametrize("name", ["image_ebt", "image_dit"])
def test_import_then_export_gives_back_the_checkpoint(imported, tmp_path, name, capsys):
    assert main(["export-reference", str(imported[name]), str(tmp_path / "back.ckpt")]) == 0
    assert "image" in capsys.readouterr().out
    original = read_reference_checkpoint(VECTORS / name / "ref.ckpt")
    back = read_reference_checkpoint(tmp_path / "back.ckpt")
    assert list(back["state_dict"]) == list(original["state_dict"])  # the paper's own order
    for key, tensor in original["state_dict"].items():
        assert torch.equal(back["state_dict"][key], tensor), key
    for key, value in original["hyper_parameters"].items():
        assert back["hyper_parameters"][key] == value, key
    assert back["hyper_parameters"]["modality"] == "IMG"
    assert back["hyper_parameters"]["model_name"] == name.removeprefix("image_")


@pytest.mark.parametrize("kind", ["ebt", "dit"])
def test_export_then_import_is_the_same_model(tmp_path, kind):
    """A run of ours (not imported) goes to the paper's layout and comes back unchanged."""
    overrides = [*TINY_IMAGE, f"model.kind={kind}", "think.landscapes=3", "think.step_size=7"]
    config = load_config(CONFIGS / "tiny.toml", overrides)
    model = build_model(config)
    with torch.no_grad():  # adaLN-Zero would leave most tensors zero: draw them all
        for name, parameter in model.named_parameters():
            if name != "step_size":
                parameter.normal_(0.0, 0.1)
    save_checkpoint(tmp_path / "ours", 5, model, config.to_dict(), None, None)
    write_run_config(tmp_path / "ours", config.to_dict())
    assert main(["export-reference", str(tmp_path / "ours"), str(tmp_path / "x.ckpt")]) == 0
    assert main(["import-reference", str(tmp_path / "x.ckpt"), str(tmp_path / "back")]) == 0
    first, second = ebt.load_run(tmp_path / "ours"), ebt.load_run(tmp_path / "back")
    assert first.config.model == second.config.model
    for key in ("image_size", "noise_level", "ood_noise_level", "diffusion_steps"):
        assert getattr(first.config.data, key) == getattr(second.config.data, key), key
    if kind == "ebt":
        assert first.config.think == second.config.think
    assert list(first.model.state_dict()) == list(second.model.state_dict())
    for key, tensor in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], tensor), key
    assert read_reference_checkpoint(tmp_path / "x.ckpt")["global_step"] == 5


def _paper_image_checkpoint(path: Path, **changes) -> Path:
    checkpoint = torch.load(VECTORS / "image_ebt" / "ref.ckpt", weights_only=True)
    checkpoint["hyper_parameters"] |= changes
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"image_task": "t2i"}, "image_task"),
        ({"image_dims": [8, 16]}, "image_dims"),
        ({"randomize_denoise_images_noise_level": True}, "randomize_denoise_images_noise_level"),
        ({"reconstruction_coeff": 2.0}, "reconstruction_coeff"),
        ({"modality": "VID"}, "modality"),
        ({"model_name": "dit"}, "model_name"),
    ],
)
def test_unsupported_image_flags_are_refused_by_name(vectors_dir, tmp_path, change, named, capsys):
    source = _paper_image_checkpoint(tmp_path / "paper.ckpt", **change)
    assert main(["import-reference", str(source), str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert named in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_image_import_refuses_a_tokenizer_and_a_foreign_position_table(
    vectors_dir, tmp_path, capsys
):
    source = _paper_image_checkpoint(tmp_path / "paper.ckpt")
    argv = ["import-reference", str(source), str(tmp_path / "run")]
    assert main([*argv, "--tokenizer", "byte"]) == 2
    assert "--tokenizer is for text checkpoints" in capsys.readouterr().err
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["state_dict"]["model.transformer.pos_embed"] += 0.5
    torch.save(checkpoint, source)
    assert main(argv) == 2
    assert "pos_embed" in capsys.readouterr().err


def test_export_refuses_what_the_papers_image_code_lacks(tmp_path, capsys):
    config = load_config(CONFIGS / "tiny.toml", [*TINY_IMAGE, "think.replay_buffer=true"])
    save_checkpoint(tmp_path / "ours", 0, build_model(config), config.to_dict(), None, None)
    assert main(["export-reference", str(tmp_path / "ours"), str(tmp_path / "x.ckpt")]) == 2
    assert "think.replay_buffer" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()


@pytest.mark.parametrize(
    ("name", "kind", "level"),
    [("paper-s1", "ebt", 0.1), ("paper-s2", "ebt", 0.2), ("paper-dit", "dit", 0.1)],
)
def test_paper_presets_parse_and_build(name, kind, level):
    config = load_config(CONFIGS / f"{name}.toml")
    model, data, train = config.model, config.data, config.train
    assert (model.modality, model.kind, model.dim, model.layers, model.heads) == (
        "image",
        kind,
        1536,
        24,
        16,
    )
    assert (model.patch_size, data.image_size, data.noise_level) == (16, 128, level)
    assert data.source == "hf:AbdoTW/COCO_2014"
    assert (train.lr, train.batch_size, train.max_steps, train.warmup_steps) == (
        1e-4,
        128,
        100000,
        10000,
    )
    assert train.weight_decay == (0.0 if kind == "dit" else 0.01)
    small = load_config(CONFIGS / f"{name}.toml", ["model.dim=64", "model.layers=1"])
    images = torch.rand(1, 3, 128, 128) * 2 - 1
    built = build_model(small)
    output = built(images, torch.tensor([3])) if kind == "dit" else built(images)
    assert torch.isfinite(output).all()


def test_paper_s2_preset_is_the_system_2_recipe():
    think = load_config(CONFIGS / "paper-s2.toml").think
    assert (think.step_size, think.step_size_learnable, think.step_size_random_scale) == (
        3000.0,
        False,
        2.0,
    )
    assert (think.random_steps, think.random_steps_min) == (2, 2)  # 2 or 3 steps
    assert think.truncate and not think.detach and think.langevin_noise == 0.0
    s1 = load_config(CONFIGS / "paper-s1.toml").think
    assert s1.steps == 1 and s1.step_size_learnable and s1.step_size_lr_multiplier == 9000.0


def test_bench_train_times_the_image_ebt_against_its_dit_twin(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CPU peak-memory child processes
    argv = ["bench", "train", str(CONFIGS / "tiny.toml"), *TINY_IMAGE, "--vs-baseline"]
    assert main([*argv, "--json", "--repeats", "1", "--warmup", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("ms_per_step", "peak_mem_mb", "baseline_ms_per_step", "baseline_peak_mem_mb"):
        assert result[key] > 0, key
    assert result["ratio_vs_baseline"] > 0 and result["ratio_vs_baseline_paired"] > 0
    assert result["config"]["model"]["modality"] == "image"
    assert result["config"]["data"]["image_size"] == 8


def test_bench_generate_refuses_image_configs(capsys):
    assert main(["bench", "generate", str(CONFIGS / "tiny.toml"), *TINY_IMAGE]) == 2
    error = capsys.readouterr().err.strip()
    assert "does not generate" in error and len(error.splitlines()) == 1
