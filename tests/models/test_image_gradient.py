"""The image energy's written-out forward and dE/dx (models/image_gradient.py) against autograd.

In float64: energies and dE/dx equal autograd's (first order) to 1e-10, the training loss's
parameter gradients through one and two thinking steps equal those of autograd's create_graph
double backward to 1e-10, and each hand-written derivative passes gradcheck. Training then
differentiates one first-order graph: autograd.grad is never called.
"""

from __future__ import annotations

import pytest
import torch
from support.tolerances import relative
from support.vision import count_calls

from ebt.config import ThinkConfig
from ebt.modalities import ImageTask
from ebt.modalities.image.diffusion import GaussianDiffusion
from ebt.models import image_gradient
from ebt.models.image_energy import ImageEnergyArgs, ImageEnergyTransformer
from ebt.training.objective import Objective

TOLERANCE = 1e-10  # relative to the largest expected magnitude, float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only spin
SHAPES = {  # image_size, patch_size, dim, layers, heads, ffn_dim
    "two-blocks": dict(image_size=8, patch_size=2, dim=16, layers=2, heads=2),
    "wide-mlp": dict(image_size=8, patch_size=4, dim=16, layers=1, heads=4, ffn_dim=24),
    "one-head": dict(image_size=4, patch_size=2, dim=8, layers=3, heads=1),
}


def _model(scale: float = 0.3, **shape) -> ImageEnergyTransformer:
    """A float64 image EBT with every weight drawn N(0, scale^2) (adaLN-Zero would make a
    fresh model's energy constant)."""
    args = ImageEnergyArgs(channels=3, step_size=0.5, **shape)
    model = ImageEnergyTransformer(args).double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name not in ("step_size", "langevin_std"):
                parameter.normal_(0.0, scale)
    return model


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return relative(actual, expected, floor=1e-30)


def _written_out_calls():
    """Count the written-out energy-and-gradient passes (image_gradient) while inside."""
    return count_calls(image_gradient, "energies_and_gradient")


def _both_paths(model: ImageEnergyTransformer, images: torch.Tensor, create_graph: bool):
    """((energies, dE/dx) written out, the same from autograd), each asserted to have taken
    its path (a gate that falls back to autograd would compare autograd with itself)."""
    results = []
    for written in (True, False):
        model.hand_written_gradients = written
        with _written_out_calls() as calls:
            results.append(model.energies_and_gradient(None, images, create_graph=create_graph))
        assert len(calls) == written, f"written out: {written}, passes: {len(calls)}"
    model.hand_written_gradients = True
    return results


@pytest.mark.parametrize("name", list(SHAPES))
def test_energies_and_gradient_equal_autograd(name):
    model = _model(**SHAPES[name])
    size = SHAPES[name]["image_size"]
    for height, width in ((size, size), (2 * size, size)):  # also a grid other than the built one
        images = torch.randn(3, 3, height, width, dtype=torch.float64)
        (energies, gradient), (expected_energies, expected_gradient) = _both_paths(
            model, images, create_graph=False
        )
        assert energies.shape == (3,) and gradient.shape == images.shape
        assert _relative(energies, expected_energies) <= TOLERANCE
        assert _relative(gradient, expected_gradient) <= TOLERANCE
        assert not energies.requires_grad and not gradient.is_inference()


def test_training_outputs_carry_the_graph_of_images_with_one():
    """create_graph=True: a non-leaf image keeps its graph; a leaf is cut (as autograd's)."""
    model = _model(**SHAPES["two-blocks"])
    base = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    (energies, gradient), (expected_energies, expected_gradient) = _both_paths(
        model, base * 1.5, create_graph=True
    )
    assert _relative(energies, expected_energies) <= TOLERANCE
    assert _relative(gradient, expected_gradient) <= TOLERANCE
    probe = torch.randn_like(gradient)
    (written,) = torch.autograd.grad((gradient * probe).sum(), base, retain_graph=True)
    (expected,) = torch.autograd.grad((expected_gradient * probe).sum(), base)
    assert _relative(written, expected) <= TOLERANCE
    _, leaf_gradient = model.energies_and_gradient(None, base, create_graph=True)
    assert leaf_gradient.grad_fn is not None  # a graph into the parameters, not into `base`
    assert torch.autograd.grad(leaf_gradient.sum(), base, allow_unused=True) == (None,)


RECIPES = {
    "s1": dict(landscapes=1, steps=1),
    "s1-two-steps": dict(landscapes=2, steps=1, grad_clamp=0.05),
    "s2": dict(
        landscapes=1,
        steps=2,
        detach=False,
        truncate=True,
        step_size_random_scale=2.0,
        langevin_noise=0.01,
    ),
    "s2-no-truncate": dict(landscapes=1, steps=2, detach=False, step_size_random_scale=2.0),
}


def _training_gradients(
    model, clean, think, written: bool, recompute: bool = False, takes: bool | None = None
):
    """(loss, {parameter name: gradient}) of one training forward + backward with the written
    -out path allowed (`written`) or forced off; asserted to have taken it (`takes`, default
    `written`: False where the gate must fall back to autograd on its own)."""
    model.hand_written_gradients = written
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same noise, per-image step sizes and Langevin draws
    task = ImageTask(GaussianDiffusion.for_noise_level(100, 0.1), 0.1)
    objective = Objective(model, think, task=task).train()
    objective.activation_checkpointing = recompute
    with _written_out_calls() as calls:
        output = objective.forward_backward(clean)
    takes = written if takes is None else takes
    assert (len(calls) > 0) == takes, f"written out: {takes}, passes: {len(calls)}"
    model.hand_written_gradients = True
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.loss, grads


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_training_gradients_equal_double_backward(recipe):
    model = _model(**SHAPES["two-blocks"])
    model.langevin_std.fill_(0.01)
    clean = torch.rand(3, 3, 8, 8, dtype=torch.float64) * 2 - 1
    think = ThinkConfig(step_size=0.5, **RECIPES[recipe])
    loss, grads = _training_gradients(model, clean, think, written=True)
    expected_loss, expected = _training_gradients(model, clean, think, written=False)
    assert _relative(loss, expected_loss) <= TOLERANCE
    assert grads.keys() == expected.keys()
    assert "step_size" in grads and "condition.weight" in grads
    for name, gradient in expected.items():
        assert _relative(grads[name], gradient) <= TOLERANCE, name


def test_recomputed_steps_give_the_same_gradients():
    """train.activation_checkpointing recomputes the written-out step in the backward."""
    model = _model(**SHAPES["wide-mlp"])
    clean = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    think = ThinkConfig(step_size=0.5, **RECIPES["s2"])
    _, grads = _training_gradients(model, clean, think, written=True, recompute=True)
    _, expected = _training_gradients(model, clean, think, written=False)
    for name, gradient in expected.items():
        assert _relative(grads[name], gradient) <= TOLERANCE, name


def test_training_differentiates_once(monkeypatch):
    """The written-out path never asks autograd for a gradient inside the step."""
    model = _model(**SHAPES["two-blocks"])
    clean = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    think = ThinkConfig(step_size=0.5, **RECIPES["s2"])

    def refuse(*args, **kwargs):
        raise AssertionError("autograd.grad called")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    _training_gradients(model, clean, think, written=True)
    with pytest.raises(AssertionError, match="autograd.grad called"):
        _training_gradients(model, clean, think, written=False)


def test_autograd_where_the_written_out_path_does_not_apply():
    """bf16 images (a model cast to bf16, no autocast) and hand_written_gradients=False take
    autograd; under bf16 autocast the written-out path applies (test_image_gradient_bf16)."""
    model = _model(**SHAPES["two-blocks"]).float()
    images = torch.randn(2, 3, 8, 8)  # (B, C, H, W)
    assert model.hand_written_path(images)
    assert not model.hand_written_path(images.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.hand_written_path(images)
    model.hand_written_gradients = False
    assert not model.hand_written_path(images)


def test_paper_vectors_take_the_written_out_path(vectors_dir):
    """The paper-parity tests (test_image_models, test_image_interop) run the written-out
    path: their models and images qualify."""
    from ebt.interop.image_reference import image_model_from_reference

    checkpoint = torch.load(vectors_dir / "image_ebt" / "ref.ckpt", weights_only=True)
    expected = torch.load(vectors_dir / "image_ebt" / "expected.pt", weights_only=True)
    model = image_model_from_reference(checkpoint["state_dict"], checkpoint["hyper_parameters"])
    for dtype in (torch.float32, torch.float64):
        model = model.to(dtype)
        images = expected["noisy"].to(dtype)
        assert model.hand_written_path(images)
        (energies, gradient), (expected_energies, expected_gradient) = _both_paths(
            model, images, create_graph=False
        )
        tolerance = TOLERANCE if dtype == torch.float64 else 1e-5
        assert _relative(energies, expected_energies) <= tolerance
        assert _relative(gradient, expected_gradient) <= tolerance


def _rows(*shape: int, positive: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, dtype=torch.float64)
    return (x.abs() + 0.5 if positive else x).requires_grad_()


def test_hand_written_derivatives_pass_gradcheck():
    shape = (2, 3, 2, 4)  # B, N, H, hd: rows M = 6, width D = 8
    parts = _rows(3, 4, 3, 4)  # (3, B*H, N, hd)
    weights = torch.softmax(torch.randn(4, 3, 3, dtype=torch.float64), -1).requires_grad_()
    checks = {
        "layer_norm": (image_gradient._LayerNorm.apply, (_rows(6, 8),)),
        "norm_backward": (
            image_gradient._NormBackward.apply,
            (_rows(6, 8), _rows(6, 8), _rows(6, 8), _rows(6, 1, positive=True)),
        ),
        "gelu": (image_gradient._Gelu.apply, (_rows(6, 5) * 3,)),
        "attention": (
            lambda qkv, bias: image_gradient._Attention.apply(qkv, bias, shape),
            (_rows(6, 24), _rows(24)),
        ),
        "attention_gradient": (
            lambda grad, out, p, w: image_gradient._AttentionGradient.apply(grad, out, p, w, shape),
            (_rows(6, 8), _rows(6, 8), parts, weights),
        ),
    }
    for name, (function, inputs) in checks.items():
        assert torch.autograd.gradcheck(function, inputs), name
