"""The written-out energies and dE/dx of the patch-token video EBT (models/patch_gradient.py)
against autograd of the same model (whose energies test_patch_frames checks against one
concatenated block-causal pass): first order in float64 for every variant (several candidate
groups, best-of-N rows, a context cache extended frame block by frame block, Langevin noise),
the training loss's parameter gradients (the written-out gradient differentiated once against
autograd's create_graph double backward), groups kept apart, and bf16 autocast against float64.
Every comparison asserts which path ran (a gate that falls back to autograd would compare
autograd with itself)."""

from __future__ import annotations

import copy

import pytest
import torch
from support.precision import DEVICES, OpDtypes, precision_violations
from support.tolerances import gradients, normwise, perturbed, relative
from support.vision import (
    PATCH_BATCH,
    PATCH_FRAME_DIM,
    PATCH_FRAMES,
    PATCH_SIZE,
    count_calls,
    patch_config,
    patch_frames,
    patch_model,
)

from ebt.modalities.video.task import VideoTask
from ebt.models import build_model, patch_gradient
from ebt.training.objective import Objective

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = ("time_embed", "adaln", "default", "pred_step")
BEST_OF = torch.tensor([2, 2, 2, 0, 3])  # three starts after real frame 2, one after 0, one after 3
FLOAT64 = 1e-12  # written out against autograd, float64 (measured <= 3e-15)


def both_paths(model, cache, candidates, rows=None, landscape=None, **noise):
    """(written out, autograd) (energies, dE/dx); the same seed for their Langevin noise."""
    results = []
    for written in (True, False):
        model.hand_written_gradients = written
        torch.manual_seed(5)
        with count_calls(patch_gradient, "energies_and_gradient") as calls:
            results.append(model.energies_and_gradient(cache, candidates, rows, landscape, **noise))
        assert len(calls) == written, f"written out: {written}, passes: {len(calls)}"
    model.hand_written_gradients = True
    return results


def assert_same(written, autograd, tolerance=FLOAT64):
    assert written[1].shape == autograd[1].shape
    assert relative(written[0], autograd[0]) < tolerance
    assert relative(written[1], autograd[1]) < tolerance


@pytest.mark.parametrize("variant", VARIANTS)
def test_written_out_equals_autograd_for_every_group_and_landscape(variant):
    """Every candidate frame (four groups), best-of-N rows, both landscapes (pred_step: the
    candidates' landscape against the one shared cache), Langevin noise on the patch tokens."""
    model = patch_model(variant)
    context = patch_frames(PATCH_FRAMES - 1)
    for landscape in range(2):
        cache = model.encode_context(context, landscape)
        every = patch_frames(PATCH_FRAMES - 1, seed=1)  # (B, 4, F): one group per row
        assert_same(*both_paths(model, cache, every, None, landscape))
        starts = patch_frames(len(BEST_OF), seed=2)  # (B, 5, F)
        assert_same(*both_paths(model, cache, starts, BEST_OF, landscape))
        noisy = both_paths(model, cache, every, None, landscape, langevin_std=0.3)
        assert_same(*noisy)
        assert relative(noisy[0][0], both_paths(model, cache, every, None, landscape)[0][0]) > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_written_out_equals_autograd_on_a_context_extended_frame_block_by_block(variant):
    """The rollout's KV cache: one real frame encoded, three appended one frame block at a
    time; the written-out pass on it equals autograd on it and on the cache encoded whole."""
    model = patch_model(variant)
    context = patch_frames(PATCH_FRAMES - 1)
    landscape = 1
    cache = model.encode_context(context[:, :1], landscape, model.context_capacity(4))
    for frame in range(1, 4):
        cache = model.extend_context(cache, context[:, frame : frame + 1])
    whole = model.encode_context(context, landscape)
    starts = patch_frames(len(BEST_OF), seed=3)
    for rows in (None, BEST_OF):
        candidates = starts[:, :4] if rows is None else starts
        written, autograd = both_paths(model, cache, candidates, rows, landscape)
        assert_same(written, autograd)
        model.hand_written_gradients = False
        assert_same(written, model.energies_and_gradient(whole, candidates, rows, landscape), 1e-10)
        model.hand_written_gradients = True


def test_written_out_groups_are_independent():
    """Changing candidate frame 1 changes only its energy and dE/dx (the own-group attention),
    and a real frame after row r changes nothing of candidate r (block-causal context)."""
    model = patch_model("adaln")
    context, candidates = patch_frames(PATCH_FRAMES - 1), patch_frames(PATCH_FRAMES - 1, seed=1)
    cache = model.encode_context(context, 1)
    changed = candidates.clone()
    changed[:, 1] -= 0.3
    before = model.energies_and_gradient(cache, candidates)
    after = model.energies_and_gradient(cache, changed)
    for ours, theirs in zip(before, after, strict=True):
        torch.testing.assert_close(ours[:, [0, 2, 3]], theirs[:, [0, 2, 3]], rtol=0, atol=1e-12)
        assert (ours[:, 1] - theirs[:, 1]).abs().max() > 1e-6
    later = context.clone()
    later[:, 2:] += 0.5
    moved = model.energies_and_gradient(model.encode_context(later, 1), candidates)
    for ours, theirs in zip(before, moved, strict=True):
        torch.testing.assert_close(ours[:, :2], theirs[:, :2], rtol=0, atol=1e-12)
        assert (ours[:, 2:] - theirs[:, 2:]).abs().min() > 1e-9


def training_config(variant: str):
    """A patch-token video EBT thinking 2 landscapes x 2 steps from the last frame, with
    Langevin noise."""
    config = patch_config(variant, noise=0.1)
    config.think.steps, config.think.init = 2, "last_frame"
    return config


def clips(seed: int = 4) -> torch.Tensor:
    """Clips (B, T, 3, S, S) in [-1, 1]."""
    frames = patch_frames(PATCH_FRAMES, seed)  # (B, T, F)
    return frames.view(PATCH_BATCH, PATCH_FRAMES, 3, PATCH_SIZE, PATCH_SIZE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_gradients_through_the_written_out_path_equal_double_backward(variant):
    """The objective's loss and every parameter gradient (the step size included) in float64:
    the written-out dE/dx recorded by autograd and differentiated once, against autograd's
    create_graph double backward; the same Langevin draws on both."""
    config = training_config(variant)
    torch.manual_seed(0)
    model = build_model(config).double()
    results = []
    for written in (True, False):
        model.hand_written_gradients = written
        torch.manual_seed(1)
        with count_calls(patch_gradient, "energies_and_gradient") as calls:
            output = Objective(model, config.think, task=VideoTask()).train()(clips())
        assert len(calls) == (4 if written else 0)  # 2 landscapes x 2 steps
        results.append((output.loss, gradients(output.loss, model)))
    model.hand_written_gradients = True
    (loss, ours), (expected_loss, theirs) = results
    assert relative(loss, expected_loss) < FLOAT64
    assert theirs["step_size"].abs() > 0
    for name, gradient in theirs.items():
        assert relative(ours[name], gradient) < 1e-10, name


# --- bf16 autocast ---------------------------------------------------------------------------
# As test_written_out_bf16: weights rounded to bf16 values (`perturbed`), written out and
# autograd under CPU bf16 autocast against float64 autograd. Measured worst over the variants and
# perturbation seeds 0-4 (written out / autograd under the same autocast): energies
# 1.4e-2 / 1.5e-2, dE/dx 7.7e-2 / 0.13, parameter gradients (norm-wise) 7.6e-2 / 6.6e-2. The
# bounds are about twice the worse; a dropped term or a wrong mask is O(1).
BF16_ENERGIES, BF16_GRADIENT, BF16_PARAMETERS = 3e-2, 0.25, 0.15


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_stays_close_to_float64(variant):
    """First order (best-of-N rows) and a frame step's parameter gradients under bf16 autocast,
    written out (which ran) and autograd, against float64 autograd."""
    reference = patch_model(variant)
    torch.manual_seed(0)
    reference = perturbed(reference)
    context, starts = patch_frames(PATCH_FRAMES - 1), patch_frames(len(BEST_OF), seed=2)
    targets = patch_frames(len(BEST_OF), seed=3)

    def loss_of(model, state, gradient):
        return VideoTask().loss(state - model.step_size * gradient, targets.to(gradient))

    reference.hand_written_gradients = False
    cache, leaf = reference.encode_context(context, 1), starts.clone().requires_grad_()
    energies, gradient = reference.energies_and_gradient(cache, leaf, BEST_OF, 1, True)
    expected = gradients(loss_of(reference, leaf, gradient), reference)
    model = copy.deepcopy(reference).float()
    for written in (True, False):
        model.hand_written_gradients = written
        state = starts.float().requires_grad_()
        with count_calls(patch_gradient, "energies_and_gradient") as calls:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                cache = model.encode_context(context.float(), 1)
                ours = model.energies_and_gradient(cache, state, BEST_OF, 1, True)
                grads = gradients(loss_of(model, state, ours[1]), model)
        assert len(calls) == written
        assert ours[1].dtype == torch.float32
        assert relative(ours[0], energies) < BF16_ENERGIES, written
        assert relative(ours[1], gradient) < BF16_GRADIENT, written
        assert normwise(grads, expected) < BF16_PARAMETERS, written


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_written_out_patch_pass_runs_products_in_bf16_and_statistics_in_float32(training, device):
    """Under bf16 autocast (CPU's, and CUDA's where there is a GPU) every product of the pass
    runs in bf16 except the energy head's, every softmax, norm statistic and sum in float32."""
    model = patch_model("adaln").float().to(device)
    context = patch_frames(PATCH_FRAMES - 1).float().to(device)
    starts = patch_frames(len(BEST_OF), seed=2).float().to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        cache = model.encode_context(context, 1)
        with OpDtypes() as recorder, torch.set_grad_enabled(training):
            rows = BEST_OF.to(device)
            _, gradient = model.energies_and_gradient(cache, starts, rows, 1, training)
    assert precision_violations(recorder.calls, torch.bfloat16, full_products=1) == []
    assert gradient.dtype == torch.float32 and gradient.requires_grad == training
    assert gradient.shape == (PATCH_BATCH, len(BEST_OF), PATCH_FRAME_DIM)


def test_the_written_out_patch_pass_compiles_whole():
    """train.compile: the pass traces into one graph (fullgraph; aot_eager, no C++ compiler
    needed) and computes what eager does, parameter gradients of a loss on dE/dx included."""
    model = patch_model("adaln")
    context, starts = patch_frames(PATCH_FRAMES - 1), patch_frames(len(BEST_OF), seed=2)
    compiled = torch.compile(
        patch_gradient.energies_and_gradient, fullgraph=True, backend="aot_eager"
    )
    results = []
    for function in (patch_gradient.energies_and_gradient, compiled):
        cache = model.encode_context(context, 1)
        energies, gradient = function(model, cache, starts, BEST_OF)
        results.append((energies, gradient, gradients(gradient.square().sum(), model)))
    (energies, gradient, grads), (expected_energies, expected_gradient, expected) = results
    assert relative(energies, expected_energies) < FLOAT64
    assert relative(gradient, expected_gradient) < FLOAT64
    assert normwise(grads, expected) < 1e-10
