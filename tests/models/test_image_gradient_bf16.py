"""The image energy's written-out forward and dE/dx (models/image_gradient.py) under bf16
autocast, against float64 autograd.

CPU autocast to bf16 stands in for CUDA's: the written-out pass states its precision with
explicit dtypes (products in bf16; LayerNorm statistics, softmax, GELU-tanh, row sums, the
residual streams, the adaLN folds and the energy head in float32), so it computes the same on
both. The weights are bf16 values (`_bf16_model`), so autocast's weight casts are exact and what
is compared is the rounding of the activations. Random draws are made in float32 whatever the
dtype (`_float32_draws`), so the float64 reference sees the same noise.

Tolerances (`support.tolerances.relative`: max error over the largest float64 magnitude; the
parameter gradients norm-wise over all of them): bf16 keeps 8 significant bits, 2^-9 = 2e-3 per
product operand. Measured worst over the shapes/recipes and seeds 0-3 (written out / autograd
under the same autocast): energies 9.9e-3 / 6.5e-3, dE/dx 2.1e-2 / 1.5e-2, training loss
9.2e-5 / 1.1e-4, parameter gradients 1.2e-2 / 9.8e-3, thought images 9.3e-4 (their energies
3.9e-3). The bounds are about twice the worse of the two; a dropped term is O(1), and the dtype
each op ran in is checked separately.
"""

from __future__ import annotations

import copy

import pytest
import torch
from support.precision import DEVICES, OpDtypes, precision_violations
from support.tolerances import relative
from support.vision import count_calls

from ebt.config import ThinkConfig
from ebt.modalities import ImageTask
from ebt.modalities.image.diffusion import GaussianDiffusion
from ebt.models import image_gradient
from ebt.models.image_energy import ImageEnergyArgs, ImageEnergyTransformer
from ebt.training.objective import Objective

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only spin
BF16_ENERGIES, BF16_GRADIENT = 2e-2, 4e-2  # first order: energies, dE/dx
BF16_LOSS, BF16_PARAMETERS = 3e-4, 2.5e-2  # a training step: loss, parameter gradients
BF16_STATES = 2e-3  # thought images (the image plus small steps)
SHAPES = {  # image_size, patch_size, dim, layers, heads, ffn_dim
    "two-blocks": dict(image_size=8, patch_size=2, dim=16, layers=2, heads=2),
    "wide-mlp": dict(image_size=8, patch_size=4, dim=16, layers=1, heads=4, ffn_dim=24),
}
RECIPES = {  # no grad_clamp: bf16 rounding can move an element across the clamp (a jump)
    "s1-two-steps": dict(landscapes=2, steps=1),
    "s2": dict(
        landscapes=1,
        steps=2,
        detach=False,
        truncate=True,
        step_size_random_scale=2.0,
        langevin_noise=0.01,
    ),
}


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _bf16_model(shape: str, seed: int = 0) -> ImageEnergyTransformer:
    """A float64 image EBT with every weight drawn N(0, 0.3^2) and rounded to a bf16 value."""
    torch.manual_seed(seed)
    model = ImageEnergyTransformer(ImageEnergyArgs(channels=3, step_size=0.5, **SHAPES[shape]))
    model = model.double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name not in ("step_size", "langevin_std"):
                parameter.normal_(0.0, 0.3).copy_(parameter.bfloat16())
    return model


def _float32_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.randn_like draws in float32 and casts: the same noise in float32 and float64."""
    original = torch.randn_like

    def drawn_in_float32(x: torch.Tensor, **kwargs) -> torch.Tensor:
        return original(x, dtype=torch.float32, **kwargs).to(x.dtype)

    monkeypatch.setattr(torch, "randn_like", drawn_in_float32)


def _passes():
    """Count the written-out energy-and-gradient passes (image_gradient) while inside."""
    return count_calls(image_gradient, "energies_and_gradient")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_energies_and_gradient_under_bf16_autocast_match_float64(shape):
    """Inference's written-out (energies, dE/dx) under bf16 autocast, which did run, against
    float64 autograd; autograd's under the same autocast as well."""
    reference = _bf16_model(shape)
    reference.hand_written_gradients = False
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)  # (B, C, H, W)
    expected_energies, expected_gradient = reference.energies_and_gradient(None, images)
    model = copy.deepcopy(reference).float()
    for written in (True, False):
        model.hand_written_gradients = written
        with _autocast(), _passes() as passes:
            energies, gradient = model.energies_and_gradient(None, images.float())
        assert len(passes) == written
        assert gradient.dtype == torch.float32 and gradient.shape == images.shape
        assert energies.dtype == torch.float32 or not written
        assert relative(energies, expected_energies, floor=1e-30) <= BF16_ENERGIES, written
        assert relative(gradient, expected_gradient, floor=1e-30) <= BF16_GRADIENT, written


def _training(model, clean, think, written: bool, bf16: bool):
    """(loss, {parameter: gradient}) of one training forward + backward, asserted to have taken
    the path asked for."""
    model.hand_written_gradients = written
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same noise, per-image step sizes and Langevin draws
    task = ImageTask(GaussianDiffusion.for_noise_level(100, 0.1), 0.1)
    objective = Objective(model, think, task=task).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), _passes() as passes:
        output = objective.forward_backward(clean)
    assert (len(passes) > 0) == written, f"written out: {written}, passes: {len(passes)}"
    model.hand_written_gradients = True
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.loss, grads


def _normwise(ours: dict, theirs: dict) -> float:
    ours = torch.cat([ours[name].double().flatten() for name in theirs])
    theirs = torch.cat([gradient.double().flatten() for gradient in theirs.values()])
    return ((ours - theirs).norm() / theirs.norm()).item()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_training_step_under_bf16_autocast_matches_float64(recipe, monkeypatch):
    """The training loss and every parameter gradient under bf16 autocast (the written-out dE/dx
    differentiated once) against float64 autograd's double backward; autograd's double backward
    under the same autocast as well."""
    _float32_draws(monkeypatch)
    reference = _bf16_model("two-blocks")
    reference.langevin_std.fill_(0.01)
    clean = torch.rand(3, 3, 8, 8, dtype=torch.float64) * 2 - 1  # (B, C, H, W)
    think = ThinkConfig(step_size=0.5, **RECIPES[recipe])
    expected_loss, expected = _training(reference, clean, think, written=False, bf16=False)
    model = copy.deepcopy(reference).float()
    for written in (True, False):
        loss, grads = _training(model, clean.float(), think, written, bf16=True)
        assert grads.keys() == expected.keys() and "condition.weight" in grads
        assert loss.dtype == torch.float32
        assert relative(loss, expected_loss) <= BF16_LOSS, written
        assert _normwise(grads, expected) <= BF16_PARAMETERS, written


def test_recomputed_steps_under_bf16_autocast_give_the_same_gradients():
    """train.activation_checkpointing recomputes the written-out step in the backward under the
    autocast state of its forward: the same loss and gradients, bit for bit."""
    model = _bf16_model("two-blocks").float()
    clean = torch.rand(2, 3, 8, 8) * 2 - 1  # (B, C, H, W)
    think = ThinkConfig(step_size=0.5, **RECIPES["s2"])
    results = []
    for recompute in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        task = ImageTask(GaussianDiffusion.for_noise_level(100, 0.1), 0.1)
        objective = Objective(model, think, task=task).train()
        objective.activation_checkpointing = recompute
        with _autocast():
            loss = objective.forward_backward(clean).loss
        results.append((loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss, grads), (expected_loss, expected) = results
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(grads, expected, strict=True))


def test_thinking_under_bf16_autocast_matches_float64():
    reference = _bf16_model("two-blocks")
    noisy = torch.randn(2, 3, 8, 8, dtype=torch.float64) * 0.5  # (B, C, H, W)
    expected = reference.think(noisy, steps=2)
    model = copy.deepcopy(reference).float()
    with _autocast(), _passes() as passes:
        trajectory = model.think(noisy.float(), steps=2)
    assert len(passes) == 2 and trajectory.states[-1].dtype == torch.float32
    for ours, theirs in zip(trajectory.states, expected.states, strict=True):
        assert relative(ours, theirs) <= BF16_STATES
    for ours, theirs in zip(trajectory.energies, expected.energies, strict=True):
        assert relative(ours, theirs) <= BF16_ENERGIES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_written_out_pass_runs_products_in_bf16_and_statistics_in_float32(training, device):
    """Under bf16 autocast every matrix product of the written-out pass runs in bf16 except the
    adaLN folds' biases (two per block) and the energy head's (two), in float32; every softmax,
    LayerNorm, sum and GELU sigmoid in float32. (CPU autocast leaves addmv/mv/dot in float32
    anyway; CUDA's would not: the gpu case checks the explicit guard. Autograd's backward of
    the pass reduces bf16 products' bias gradients in bf16, as for any Linear under autocast.)"""
    model = _bf16_model("two-blocks").float().to(device)
    images = torch.randn(2, 3, 8, 8, device=device)  # (B, C, H, W)
    with torch.autocast(device, dtype=torch.bfloat16), torch.set_grad_enabled(training):
        with OpDtypes() as recorder:
            energies, gradient = model.energies_and_gradient(None, images, create_graph=training)
    folds_and_head = 2 * len(model.blocks) + 2
    sigmoid = frozenset({"sigmoid", "sigmoid_"})
    assert precision_violations(recorder.calls, torch.bfloat16, folds_and_head, sigmoid) == []
    assert energies.dtype == gradient.dtype == torch.float32
    assert gradient.requires_grad == training
