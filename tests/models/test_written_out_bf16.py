"""The written-out candidate gradient (models/candidate_gradient.py) under bf16 autocast.

CPU autocast to bf16 stands in for CUDA's: the written-out pass states its precision with
explicit dtypes (products in bf16; RMSNorm statistics, rotations, softmax, row sums, the residual
streams and the energy head in float32), so it computes the same on both. Checked, for every
variant of the float64 tests (text and video), against float64 autograd of the naive model: the
energies and dE/dp of inference and a training step's loss and parameter gradients (the
written-out gradient differentiated once). The path is asserted to have run, and a dispatch
recorder checks which dtype each product and statistic ran in.

Tolerances (`support.tolerances.relative`: max error over the largest float64 magnitude; for
the parameter gradients, norm-wise over all of them). bf16 keeps 8 significant bits, a rounding
of 2^-9 = 2e-3 per product operand; the weights here are bf16 values (`perturbed`), so what is
compared is the rounding of the activations, context keys and values, through two blocks, the
RMSNorm backward (a projection, whose cancellation amplifies relative errors) and the energy
head. Measured worst over the variants and seeds 0-4 (written out / autograd under the same
autocast): energies 2.7e-2 / 5.2e-2, dE/dp 0.11 / 0.18, step loss 2.2e-2 / 3.5e-2, parameter
gradients 8.8e-2 / 0.12 (float32 reaches ~3e-7 on the same problems: these tiny random models
are ill-conditioned, not the pass). The bounds are about twice the worse of the two; a dropped
term or a wrong mask is O(1), and the dtype each op ran in is checked separately.
"""

from __future__ import annotations

import copy

import pytest
import torch
from support.naive_reference import (
    cross_entropy,
    linear,
    naive_energies,
    naive_energies_of_embeddings,
    naive_step,
)
from support.precision import DEVICES, OpDtypes, precision_violations
from support.text import written_out_calls
from support.tolerances import gradients, normwise, perturbed, relative
from support.vision import video_model
from torch.nn import functional as F

from ebt.config import config_from_dict
from ebt.modalities.video.task import VideoTask
from ebt.models import build_model, candidate_gradient
from ebt.thinking.loop import StepOptions, take_step

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only spin
VARIANTS = ("time_embed", "adaln", "default", "pred_step")
VOCAB, DIM, SEQ, BATCH = 13, 16, 6, 2
BF16_ENERGIES, BF16_GRADIENT = 0.1, 0.3  # first order: energies, dE/dp
BF16_LOSS, BF16_PARAMETERS = 6e-2, 0.2  # a training step: loss, parameter gradients (norm-wise)


def autocast(enabled: bool = True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def text_model(variant: str) -> torch.nn.Module:
    """A tiny float64 text EBT with every weight moved off its initialisation (a non-trivial
    adaLN modulation and energy head)."""
    config = config_from_dict(
        {
            "model": {"variant": variant, "dim": DIM, "layers": 2, "heads": 2},
            "data": {"seq_len": SEQ + 2},
            "think": {"step_size": 10.0, "landscapes": 2, "steps": 1},
        }
    )
    return perturbed(build_model(config, VOCAB).double())


def tokens(length: int = SEQ) -> torch.Tensor:
    return torch.randint(1, VOCAB, (BATCH, length))  # (B, S)


def first_order(model, context, candidates, written: bool, landscape: int = 1):
    """(energies, dE/dx) at inference under bf16 autocast, written out or by autograd."""
    model.hand_written_gradients = written
    with autocast():
        cache = model.encode_context(context, landscape)
        result = model.energies_and_gradient(cache, candidates, None, landscape)
    model.hand_written_gradients = True
    return result


# --- text -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_first_order_under_bf16_autocast_matches_float64(variant, monkeypatch):
    """Inference's written-out (energies, dE/dp) under bf16 autocast, which did run, against
    float64 autograd of the naive model; autograd's under the same autocast as well."""
    torch.manual_seed(0)
    reference, context = text_model(variant), tokens()
    probabilities = torch.randn(BATCH, SEQ, VOCAB, dtype=torch.float64).softmax(-1)
    leaf = probabilities.clone().requires_grad_()
    expected = naive_energies(reference, context, leaf, 1)  # (B, S)
    (expected_gradient,) = torch.autograd.grad(expected.sum(), leaf)  # (B, S, V)
    model = copy.deepcopy(reference).float()
    calls = written_out_calls(monkeypatch)
    for written in (True, False):
        energies, gradient = first_order(model, context, probabilities.float(), written)
        assert energies.dtype == gradient.dtype == torch.float32 or not written
        assert relative(energies, expected) < BF16_ENERGIES, written
        assert relative(gradient, expected_gradient) < BF16_GRADIENT, written
    assert calls == ["inference"]


def step_loss(model, context, targets, init, written: bool) -> torch.Tensor:
    """Cross-entropy of y' after one thinking step on landscape 1, its dE/dp keeping its graph
    (written out, or autograd's create_graph)."""
    model.hand_written_gradients = written
    cache = model.encode_context(context, 1)
    options = StepOptions(step_size=model.step_size, create_graph=True)
    state, _ = take_step(model, cache, init.clone().requires_grad_(), options, keep_graph=True)
    model.hand_written_gradients = True
    return F.cross_entropy(state.flatten(0, 1), targets.flatten())  # (B, S, V) -> scalar


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_training_step_under_bf16_autocast_matches_float64(variant, monkeypatch):
    """One thinking step's loss and every parameter gradient under bf16 autocast (the written-out
    dE/dp recorded by autograd and differentiated once) against the naive float64 double
    backward; autograd's double backward under the same autocast as well."""
    torch.manual_seed(0)
    reference, sequence = text_model(variant), tokens(SEQ + 1)
    context, targets = sequence[:, :-1], sequence[:, 1:]
    init = torch.randn(BATCH, SEQ, VOCAB, dtype=torch.float64)  # (B, S, V)
    state, _ = naive_step(reference, context, init, 1)
    expected_loss = cross_entropy(state, targets)
    expected = gradients(expected_loss, reference)
    model = copy.deepcopy(reference).float()
    for written in (True, False):
        calls = written_out_calls(monkeypatch)
        with autocast():
            loss = step_loss(model, context, targets, init.float(), written)
            grads = gradients(loss, model)
        assert calls == (["graph"] if written else [])
        assert loss.dtype == torch.float32
        assert relative(loss, expected_loss) < BF16_LOSS, written
        assert normwise(grads, expected) < BF16_PARAMETERS, written


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("variant", ["adaln", "time_embed"])
def test_written_out_pass_runs_products_in_bf16_and_statistics_in_float32(
    variant, training, device
):
    """Under bf16 autocast every matrix product of the written-out pass runs in bf16 except the
    energy head's (float32), and every softmax, norm statistic and sum runs in float32."""
    model = copy.deepcopy(text_model(variant)).float().to(device)
    probabilities = torch.randn(BATCH, SEQ, VOCAB, device=device).softmax(-1)
    with torch.autocast(device, dtype=torch.bfloat16):
        cache = model.encode_context(tokens().to(device), 1)
        with OpDtypes() as recorder, torch.set_grad_enabled(training):
            _, gradient = model.energies_and_gradient(cache, probabilities, None, 1, training)
    assert precision_violations(recorder.calls, torch.bfloat16, full_products=1) == []
    assert gradient.dtype == torch.float32 and gradient.requires_grad == training


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_token_context_extension_under_bf16_autocast_matches_float64(variant, monkeypatch):
    """Generation's written-out one-token context pass (extend_context_by_one), which did run
    under bf16 autocast (products in bf16, softmax and norm statistics in float32), against the
    float64 context stream: keys and values within the rounding of the bf16 context stream
    itself (measured 5.7e-3, as encode_context's under autocast; bound 2e-2)."""
    torch.manual_seed(0)
    reference, sequence = text_model(variant), tokens(8)
    expected = reference.encode_context(sequence, 1)
    model = copy.deepcopy(reference).float()
    calls = written_out_calls(monkeypatch, "extend_context_by_one")
    with autocast():
        cache = model.encode_context(sequence[:, :5], 1, capacity=8)
        with OpDtypes() as recorder:
            for position in range(5, 8):
                cache = model.extend_context(cache, sequence[:, position : position + 1])
    assert calls == ["inference"] * 3
    assert precision_violations(recorder.calls, torch.bfloat16, full_products=0) == []
    pairs = zip(cache.keys + cache.values, expected.keys + expected.values, strict=True)
    assert max(relative(ours, theirs) for ours, theirs in pairs) < 2e-2


def test_the_written_out_pass_compiles_whole_under_bf16_autocast():
    """train.compile with bf16: the written-out pass (its explicit-dtype blocks included) traces
    into one graph (fullgraph; aot_eager, no C++ compiler needed) and computes what eager does
    (energies and dE/dp to float32 rounding; the parameter gradients of a loss on dE/dp to bf16
    rounding)."""
    torch.manual_seed(0)
    model = copy.deepcopy(text_model("adaln")).float()
    probabilities = torch.randn(BATCH, SEQ, VOCAB).softmax(-1).requires_grad_()
    context = tokens()
    compiled = torch.compile(
        candidate_gradient.energies_and_gradient, fullgraph=True, backend="aot_eager"
    )
    results = []
    for function in (candidate_gradient.energies_and_gradient, compiled):
        with autocast():
            cache = model.encode_context(context, 1)
            energies, gradient = function(model, cache, probabilities)
            grads = gradients(energies.sum() + gradient.square().sum(), model)
        results.append((energies, gradient, grads))
    (energies, gradient, grads), (expected_energies, expected_gradient, expected) = results
    assert energies.dtype == gradient.dtype == torch.float32
    assert relative(energies, expected_energies) < 1e-6
    assert relative(gradient, expected_gradient) < 1e-6
    # the backward graph is autocast's too, and AOTAutograd rounds some of its intermediates
    # to bf16 elsewhere than eager autograd does: observed 1.3e-3 norm-wise (2^-9 = 2e-3)
    assert normwise(grads, expected) < 1e-2


# --- video: the same pass on frame vectors ----------------------------------------------------


def video_problem(variant: str):
    """(float64 model, context frames (B, S, F), candidate frames (B, S, F))."""
    torch.manual_seed(0)
    model = perturbed(video_model(variant, frames=6))
    frames = torch.rand(BATCH, 6, 12, dtype=torch.float64) * 2 - 1  # (B, T, F)
    return model, frames[:, :-1], torch.randn(BATCH, 5, 12, dtype=torch.float64)


def naive_video(model, context, candidates) -> torch.Tensor:
    """Naive float64 energies (B, S) of frame candidates on landscape 1."""
    embed = model.frame_embedding
    return naive_energies_of_embeddings(model, linear(context, embed), linear(candidates, embed), 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_video_first_order_under_bf16_autocast_matches_float64(variant):
    reference, context, candidates = video_problem(variant)
    leaf = candidates.clone().requires_grad_()
    expected = naive_video(reference, context, leaf)  # (B, S)
    (expected_gradient,) = torch.autograd.grad(expected.sum(), leaf)  # (B, S, F)
    model = copy.deepcopy(reference).float()
    for written in (True, False):
        energies, gradient = first_order(model, context.float(), candidates.float(), written)
        assert gradient.dtype == torch.float32
        assert relative(energies, expected) < BF16_ENERGIES, written
        assert relative(gradient, expected_gradient) < BF16_GRADIENT, written


@pytest.mark.parametrize("variant", VARIANTS)
def test_video_training_gradients_under_bf16_autocast_match_float64(variant, monkeypatch):
    """A frame step's loss gradients into the parameters (second-order terms through the
    written-out dE/dx) against float64 autograd's double backward of the naive model."""
    reference, context, candidates = video_problem(variant)
    targets = torch.rand_like(candidates)

    def loss_of(model, candidates, gradient):
        return VideoTask().loss(candidates - model.step_size * gradient, targets.to(gradient))

    leaf = candidates.clone().requires_grad_()
    energies = naive_video(reference, context, leaf)
    (gradient,) = torch.autograd.grad(energies.sum(), leaf, create_graph=True)
    expected = gradients(loss_of(reference, leaf, gradient), reference)
    model = copy.deepcopy(reference).float()
    state = candidates.float().requires_grad_()
    calls = written_out_calls(monkeypatch)
    with autocast():
        cache = model.encode_context(context.float(), 1)
        _, gradient = model.energies_and_gradient(cache, state, None, 1, True)
        grads = gradients(loss_of(model, state, gradient), model)
    assert calls == ["graph"]
    assert normwise(grads, expected) < BF16_PARAMETERS
