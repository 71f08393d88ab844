"""The fused prediction route inside the models (nn.attention's anchored SDPA): the energies
of `EnergyTransformer.energies` and inference's written-out (energies, dE/dp) (its attention
backward by the fused kernel's own first-order backward) equal the naive float64 model, for
every variant, all rows or a subset; thinking is unchanged; training never takes it; and under
bf16 autocast it stays within the bf16 bounds of test_written_out_bf16.

The route is forced on CPU here (FUSED_PREDICTION_ATTENTION = "any"); its default is CUDA, where
the gpu-marked test checks it against the written-out scores."""

from __future__ import annotations

import copy

import pytest
import torch
from support.naive_reference import naive_energies
from support.text import written_out_calls
from support.tolerances import relative

from ebt.config import config_from_dict
from ebt.models import build_model
from ebt.nn import attention

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = ("time_embed", "adaln", "default", "pred_step")
VOCAB, SEQ, BATCH = 13, 6, 2
TIGHT, TIGHT_GRAD = 1e-10, 1e-8  # float64 (observed ~1e-15), as test_model_contract
BF16_ENERGIES, BF16_GRADIENT = 0.1, 0.3  # as test_written_out_bf16 (measured there)


def _model(variant: str) -> torch.nn.Module:
    """A tiny float64 text EBT, its weights moved off their initialisation (bf16 values)."""
    config = config_from_dict(
        {
            "model": {"variant": variant, "dim": 16, "layers": 2, "heads": 2},
            "data": {"seq_len": SEQ + 2},
            "think": {"step_size": 10.0, "landscapes": 2, "steps": 1},
        }
    )
    model = build_model(config, VOCAB).double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name not in ("step_size", "langevin_std"):
                parameter.add_(0.05 * torch.randn_like(parameter)).copy_(parameter.bfloat16())
    return model


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """The fused route forced on; records each anchored SDPA call."""
    calls: list[int] = []
    original = attention.anchored_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "anchored_attention", counted)
    monkeypatch.setattr(attention, "FUSED_PREDICTION_ATTENTION", "any")
    return calls


def _expected(model, tokens, probabilities, index):
    """Naive float64 (energies (B, R), dE/dp (B, R, V)) of the rows `index`."""
    leaf = probabilities.clone().requires_grad_()
    energies = naive_energies(model, tokens, leaf, 1)  # (B, S)
    (gradient,) = torch.autograd.grad(energies.sum(), leaf)  # (B, S, V)
    return energies.detach()[:, index], gradient[:, index]


@pytest.mark.parametrize("rows", [None, [4, 0, 2]], ids=["all", "subset"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_route_equals_the_naive_model(variant, rows, fused_calls, monkeypatch):
    torch.manual_seed(0)
    model, tokens = _model(variant), torch.randint(1, VOCAB, (BATCH, SEQ))
    probabilities = torch.randn(BATCH, SEQ, VOCAB, dtype=torch.float64).softmax(-1)
    index = torch.arange(SEQ) if rows is None else torch.tensor(rows)
    given = None if rows is None else index
    expected_energies, expected_gradient = _expected(model, tokens, probabilities, index)
    cache = model.encode_context(tokens, 1)
    written = written_out_calls(monkeypatch)
    energies, gradient = model.energies_and_gradient(cache, probabilities[:, index], given, 1)
    assert written == ["inference"] and len(fused_calls) == 2  # one SDPA per layer
    assert relative(energies, expected_energies, floor=1e-30) < TIGHT
    assert relative(gradient, expected_gradient, floor=1e-30) < TIGHT_GRAD
    with torch.no_grad():
        energies = model.energies(cache, probabilities[:, index], given, 1)
    assert len(fused_calls) == 4
    assert relative(energies, expected_energies, floor=1e-30) < TIGHT


def test_thinking_on_the_fused_route_is_unchanged(fused_calls, monkeypatch):
    """model.think (inference, with accept_lower_energies: both fused passes) equals the
    written-out scores' thinking."""
    torch.manual_seed(1)
    model, tokens = _model("time_embed"), torch.randint(1, VOCAB, (BATCH, SEQ))
    init = torch.randn(BATCH, SEQ, VOCAB, dtype=torch.float64)
    fused = model.think(tokens, init, accept_lower_energies=True)
    assert fused_calls
    monkeypatch.setattr(attention, "FUSED_PREDICTION_ATTENTION", "off")
    calls = len(fused_calls)
    written = model.think(tokens, init, accept_lower_energies=True)
    assert len(fused_calls) == calls
    pairs = zip(fused.states + fused.energies, written.states + written.energies, strict=True)
    for ours, theirs in pairs:
        assert relative(ours, theirs, floor=1e-30) < TIGHT


def test_training_never_takes_the_fused_route(fused_calls):
    """With grad enabled (a training step's create_graph) the written-out scores run: the
    fused kernels have no double backward."""
    model, tokens = _model("adaln"), torch.randint(1, VOCAB, (BATCH, SEQ))
    probabilities = torch.randn(BATCH, SEQ, VOCAB, dtype=torch.float64).softmax(-1)
    cache = model.encode_context(tokens, 1)
    _, gradient = model.energies_and_gradient(cache, probabilities.requires_grad_(), None, 1, True)
    model.energies(cache, probabilities)
    assert gradient.requires_grad and fused_calls == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_route_under_bf16_autocast_matches_float64(variant, fused_calls):
    torch.manual_seed(0)
    reference, tokens = _model(variant), torch.randint(1, VOCAB, (BATCH, SEQ))
    probabilities = torch.randn(BATCH, SEQ, VOCAB, dtype=torch.float64).softmax(-1)
    expected_energies, expected_gradient = _expected(
        reference, tokens, probabilities, torch.arange(SEQ)
    )
    model = copy.deepcopy(reference).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.encode_context(tokens, 1)
        energies, gradient = model.energies_and_gradient(cache, probabilities.float(), None, 1)
    assert len(fused_calls) == 2 and gradient.dtype == torch.float32
    assert relative(energies, expected_energies) < BF16_ENERGIES
    assert relative(gradient, expected_gradient) < BF16_GRADIENT


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_cuda_takes_the_fused_route_by_default(bf16, monkeypatch):
    """On CUDA (default setting), inference's energies and dE/dp take the fused route and agree
    with the written-out scores (float32: to its rounding; bf16 autocast: within its bounds)."""
    torch.manual_seed(0)
    model = copy.deepcopy(_model("time_embed")).float().cuda()
    tokens = torch.randint(1, VOCAB, (BATCH, SEQ), device="cuda")
    probabilities = torch.randn(BATCH, SEQ, VOCAB, device="cuda").softmax(-1)
    results = []
    for setting in ("cuda", "off"):
        monkeypatch.setattr(attention, "FUSED_PREDICTION_ATTENTION", setting)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            cache = model.encode_context(tokens, 1)
            results.append(model.energies_and_gradient(cache, probabilities, None, 1))
    (energies, gradient), (expected_energies, expected_gradient) = results
    bounds = (BF16_ENERGIES, BF16_GRADIENT) if bf16 else (1e-5, 1e-5)
    assert relative(energies, expected_energies) < bounds[0]
    assert relative(gradient, expected_gradient) < bounds[1]
