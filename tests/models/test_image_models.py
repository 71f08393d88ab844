"""The image models: the bidirectional energy transformer, the DiT baseline and its diffusion.

Parity with the paper's own code on its checkpoints (../shared/vectors/image_ebt, image_dit;
computed in float32): our models reproduce them in float32 and float64 to a relative 1e-4
(observed <= 2e-6). The paper's thinking step is written out here, as the paper's code takes it:
state <- state.detach() - clamp(alpha, 1e-4) * dE/dstate, create_graph in training, loss =
SmoothL1(beta 1) against the clean image averaged over the steps.
"""

from __future__ import annotations

import pytest
import torch
from support.tolerances import relative
from torch.func import functional_call

from ebt.config import ThinkConfig, load_config
from ebt.interop.image_reference import (
    convert_image_state_dict,
    image_model_from_reference,
    image_our_key,
    image_reference_state_dict,
)
from ebt.modalities import ImageTask
from ebt.modalities.image.diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood
from ebt.models.builders import build_model
from ebt.models.dit import DiT, DiTArgs
from ebt.models.image_energy import ImageEnergyArgs, ImageEnergyTransformer
from ebt.nn.dit import patch_grid, patchify, sincos_position_table, unpatchify
from ebt.training.objective import Objective

TOLERANCE = 1e-4  # relative to the largest expected magnitude, float32 and float64 alike
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only spin
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])


def _load(vectors_dir, name: str, dtype: torch.dtype):
    checkpoint = torch.load(vectors_dir / name / "ref.ckpt", weights_only=True)
    expected = torch.load(vectors_dir / name / "expected.pt", weights_only=True)
    model = image_model_from_reference(checkpoint["state_dict"], checkpoint["hyper_parameters"])
    return model.to(dtype), checkpoint, expected


def _check_gradients(model, expected_grads: dict) -> None:
    parameters = dict(model.named_parameters())
    trained = {name for name, p in parameters.items() if p.requires_grad}
    assert {image_our_key(key) for key in expected_grads} == trained
    for key, expected in expected_grads.items():
        actual = parameters[image_our_key(key)].grad
        assert relative(actual, expected) <= TOLERANCE, key


@DTYPES
def test_image_ebt_thinking_matches_paper(vectors_dir, dtype):
    """The shared thinking loop (model.think) on the paper's noisy images."""
    model, _, expected = _load(vectors_dir, "image_ebt", dtype)
    schedule = GaussianDiffusion.for_noise_level(100, 0.1)
    clean, noise = expected["clean"].to(dtype), expected["noise"].to(dtype)
    noisy = schedule.q_sample(clean, expected["timestep"], noise)  # (B, C, H, W)
    assert relative(noisy, expected["noisy"]) <= TOLERANCE
    trajectory = model.think(expected["noisy"].to(dtype))  # 2 landscapes of 1 step
    assert len(trajectory.states) == len(expected["states"]) == 2
    for k in range(2):
        assert relative(trajectory.energies[k], expected["energies"][k]) <= TOLERANCE
        assert relative(trajectory.states[k], expected["states"][k]) <= TOLERANCE


@DTYPES
def test_image_ebt_training_gradients_match_paper(vectors_dir, dtype, monkeypatch):
    """The shared Objective with the image task: loss per step and second-order gradients."""
    model, _, expected = _load(vectors_dir, "image_ebt", dtype)
    task = ImageTask(GaussianDiffusion.for_noise_level(100, 0.1), 0.1)
    noisy = expected["noisy"].to(dtype)
    monkeypatch.setattr(task, "initial_state", lambda *args: noisy.clone())
    think = ThinkConfig(landscapes=1, steps=2, step_size=60.0)
    output = Objective(model, think, task=task).train()(expected["clean"].to(dtype))
    assert relative(output.loss, expected["train_loss"]) <= TOLERANCE
    assert relative(output.metrics["initial_loss"], expected["train_initial_loss"]) <= TOLERANCE
    assert relative(output.metrics["final_step_loss"], expected["train_final_loss"]) <= TOLERANCE
    output.loss.backward()
    _check_gradients(model, expected["train_grads"])


def test_schedule_matches_paper(vectors_dir):
    schedule = GaussianDiffusion.for_noise_level(100, 0.1)
    assert schedule.steps == 1000
    for name in ("image_ebt", "image_dit"):
        expected = torch.load(vectors_dir / name / "expected.pt", weights_only=True)
        assert relative(schedule.alphas_cumprod, expected["alphas_cumprod"]) <= 1e-12
    assert schedule.timestep_for_level(0.1) == 99 and schedule.timestep_for_level(0.2) == 199
    assert schedule.alphas_cumprod[99].item() == pytest.approx(0.897, abs=5e-4)
    assert schedule.alphas_cumprod[199].item() == pytest.approx(0.659, abs=5e-4)


@DTYPES
def test_dit_output_loss_and_gradients_match_paper(vectors_dir, dtype):
    model, _, expected = _load(vectors_dir, "image_dit", dtype)
    clean, noise = expected["clean"].to(dtype), expected["noise"].to(dtype)
    timesteps = expected["train_timesteps"]
    assert relative(model(clean, timesteps), expected["output"]) <= TOLERANCE
    schedule = GaussianDiffusion.for_noise_level(100, 0.1)
    terms = schedule.training_losses(model, clean, timesteps, noise)
    assert relative(terms.loss.mean(), expected["train_loss"]) <= TOLERANCE
    assert relative(terms.mse.mean(), expected["train_mse"]) <= TOLERANCE
    assert relative(terms.vb.mean(), expected["train_vb"]) <= TOLERANCE
    terms.loss.mean().backward()
    _check_gradients(model, expected["train_grads"])


@DTYPES
def test_dit_ddim_chain_matches_paper(vectors_dir, dtype):
    model, _, expected = _load(vectors_dir, "image_dit", dtype)
    schedule = GaussianDiffusion.for_noise_level(100, 0.1)
    start = int(expected["ddim_start_timestep"])
    t = torch.full((2,), start)
    noisy = schedule.q_sample(expected["clean"].to(dtype), t, expected["noise"].to(dtype))
    assert relative(noisy, expected["ddim_noisy"]) <= TOLERANCE
    denoised = schedule.ddim(model, expected["ddim_noisy"].to(dtype), start)
    assert relative(denoised, expected["ddim_denoised"]) <= TOLERANCE


@pytest.mark.parametrize("name", ["image_ebt", "image_dit"])
def test_reference_names_round_trip(vectors_dir, name):
    checkpoint = torch.load(vectors_dir / name / "ref.ckpt", weights_only=True)
    reference = checkpoint["state_dict"]
    ours = convert_image_state_dict(reference)
    back = image_reference_state_dict(ours, dit=name == "image_dit", patches=16)
    assert back.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.allclose(back[key], value, atol=1e-7), key


def test_position_table_is_the_papers(vectors_dir):
    checkpoint = torch.load(vectors_dir / "image_ebt" / "ref.ckpt", weights_only=True)
    stored = checkpoint["state_dict"]["model.transformer.pos_embed"][0]  # (16, 32)
    assert torch.allclose(sincos_position_table(32, 4, 4).float(), stored, atol=1e-7)


def _tiny_ebt(scale: float = 0.3, **changes) -> ImageEnergyTransformer:
    args = ImageEnergyArgs(image_size=4, channels=3, patch_size=2, dim=8, layers=1, heads=2)
    model = ImageEnergyTransformer(ImageEnergyArgs(**(vars(args) | changes)))
    with torch.no_grad():  # adaLN-Zero makes a fresh model constant: draw every weight
        for name, parameter in model.named_parameters():
            if name not in ("step_size", "langevin_std"):
                parameter.normal_(0.0, scale)
    return model


def test_fresh_energy_model_is_constant():
    model = ImageEnergyTransformer(ImageEnergyArgs(image_size=8, patch_size=2, dim=16, heads=2))
    assert torch.count_nonzero(model.energy_head.linear.weight) == 0
    assert model.energy_head.linear.bias is None
    images = torch.randn(3, 3, 8, 8)
    energies, gradient = model.energies_and_gradient(None, images)
    assert torch.equal(energies, torch.zeros(3)) and torch.equal(gradient, torch.zeros_like(images))


def test_image_energy_is_mean_of_patch_energies():
    model = _tiny_ebt()
    images = torch.randn(2, 3, 4, 4)
    patches = model.patch_energies(images)  # (2, 4)
    assert patches.shape == (2, 4)
    torch.testing.assert_close(model(images), patches.mean(dim=1))


def test_permuting_patches_with_their_positions_keeps_the_energy():
    model = _tiny_ebt(image_size=8).double()
    tokens = model.patch_embedding(torch.randn(2, 3, 8, 8, dtype=torch.float64))  # (2, 16, 8)
    order = torch.randperm(tokens.shape[1])
    permuted = model.token_energies(tokens[:, order])  # (2, 16)
    torch.testing.assert_close(permuted, model.token_energies(tokens)[:, order])


def test_input_gradient_matches_finite_differences():
    model = _tiny_ebt().double()
    images = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (images,), fast_mode=True)
    _, gradient = model.energies_and_gradient(None, images)
    (expected,) = torch.autograd.grad(model(images).sum(), images)
    torch.testing.assert_close(gradient, expected)


def test_second_order_step_matches_finite_differences():
    """d(step result)/d(parameters) through dE/dx, against finite differences in float64."""
    model = _tiny_ebt().double()
    images = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    names = ("energy_head.linear.weight", "blocks.0.attention.qkv.weight", "condition.weight")

    def stepped(*weights: torch.Tensor) -> torch.Tensor:
        def energies(x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, dict(zip(names, weights, strict=True)), (x,))

        x = images.clone().requires_grad_()
        (gradient,) = torch.autograd.grad(energies(x).sum(), x, create_graph=True)
        return x - 0.5 * gradient  # (1, 3, 4, 4)

    parameters = dict(model.named_parameters())
    weights = tuple(parameters[name].detach().clone().requires_grad_() for name in names)
    assert torch.autograd.gradcheck(stepped, weights, fast_mode=True)


def test_patchify_round_trip_and_layout():
    images = torch.randn(2, 3, 4, 6)
    patches = patchify(images, 2)  # (2, 6, 12)
    assert patches.shape == (2, 6, 12)
    torch.testing.assert_close(unpatchify(patches, 2, 4, 6), images)
    # patch (row 1, column 2), pixel (0, 1), channel 2 -> feature (0 * 2 + 1) * 3 + 2
    assert patches[0, 1 * 3 + 2, 5] == images[0, 2, 2, 5]


def test_image_sizes_the_patches_do_not_tile_are_refused():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patch_grid(7, 8, 2)
    model = _tiny_ebt()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 1, 1))
    assert model(torch.randn(1, 3, 6, 8)).shape == (1,)  # computed position table


def test_dit_shapes_and_zero_initial_output():
    model = DiT(DiTArgs(image_size=8, patch_size=2, dim=16, layers=2, heads=2))
    out = model(torch.randn(3, 3, 8, 8), torch.tensor([0, 5, 99]))
    assert out.shape == (3, 6, 8, 8) and torch.count_nonzero(out) == 0


def test_vb_trains_only_the_variance_and_handles_timestep_zero():
    schedule = GaussianDiffusion(1000)
    clean = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(clean)
    output = torch.randn(2, 6, 4, 4, requires_grad=True)
    t = torch.tensor([0, 50])
    terms = schedule.hybrid_loss(output, clean, schedule.q_sample(clean, t, noise), t, noise)
    assert torch.isfinite(terms.vb).all() and (terms.vb > 0).all()
    (gradient,) = torch.autograd.grad(terms.vb.sum(), output)
    assert torch.count_nonzero(gradient[:, :3]) == 0 and torch.count_nonzero(gradient[:, 3:]) > 0

    # the decoder's bins against the exact normal CDF (it uses the tanh approximation)
    clean[0, 0, 0] = -1.0  # an edge bin: extends to -inf
    mean, scale = clean + 0.01 * noise, torch.tensor(0.05)
    upper = torch.special.ndtr((clean - mean + 1 / 255) / scale)
    exact = torch.where(
        clean < -0.999, upper, upper - torch.special.ndtr((clean - mean - 1 / 255) / scale)
    )
    ours = discretized_gaussian_log_likelihood(clean, mean, scale.log().expand_as(clean))
    torch.testing.assert_close(ours.exp(), exact, atol=2e-3, rtol=0)


def test_ddim_from_timestep_zero_is_one_clipped_estimate():
    schedule = GaussianDiffusion(1000)
    calls = []

    def zero_noise_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    noisy = torch.randn(2, 3, 4, 4)
    denoised = schedule.ddim(zero_noise_model, noisy, 0)
    expected = (noisy / schedule.alphas_cumprod[0].sqrt().float()).clamp(-1, 1)
    torch.testing.assert_close(denoised, expected)
    calls.clear()
    schedule.ddim(zero_noise_model, noisy, 9)
    assert [int(t[0]) for t in calls] == list(range(9, -1, -1))


def test_schedule_and_ddim_agree_with_diffusers():
    """An independent implementation: diffusers' schedulers (when installed) give the same
    alpha_bar and the same DDIM step (clipped x_0, noise re-derived from it)."""
    schedulers = pytest.importorskip("diffusers.schedulers")
    ours = GaussianDiffusion.for_noise_level(1000, 0.2)  # N = 5000: betas scaled by 0.2
    settings = {"beta_start": 0.2e-4, "beta_end": 0.2 * 0.02, "beta_schedule": "linear"}
    theirs = schedulers.DDIMScheduler(
        num_train_timesteps=5000, clip_sample=True, set_alpha_to_one=True, **settings
    )
    assert relative(ours.alphas_cumprod, theirs.alphas_cumprod) <= 1e-5
    theirs.set_timesteps(5000)
    x, output = torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4)
    for step in (4000, 999, 0):
        expected = theirs.step(output[:, :3], step, x, eta=0.0, use_clipped_model_output=True)
        actual = ours.ddim_step(output, x, torch.full((2,), step))
        assert relative(actual, expected.prev_sample) <= 1e-4


def test_inference_steps_are_per_landscape_for_every_modality():
    """think.landscapes=2, think.steps=3: inference_steps is 3 (steps per landscape) for the
    text and the image EBT alike, a default think() takes 2 x 3 steps and think(steps=2) 2 x 2."""
    small = ["model.dim=16", "model.layers=1", "model.heads=2", "train.device=cpu"]
    thinking = ["think.landscapes=2", "think.steps=3"]
    text = build_model(load_config("text/tiny", [*small, *thinking, "data.seq_len=4"]), 11)
    image_overrides = [*small, *thinking, "data.image_size=4", "model.patch_size=2"]
    image = build_model(load_config("image/tiny", image_overrides))
    tokens = torch.randint(0, 11, (1, 4))
    images = torch.randn(1, 3, 4, 4)
    for model, start in ((text, tokens), (image, images)):
        assert model.args.landscapes == 2 and model.args.inference_steps == 3
        assert len(model.think(start).states) == 6
        assert len(model.think(start, steps=2).states) == 4
