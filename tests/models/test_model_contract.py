"""The model contract (DESIGN §1) checked against a naive float64 concatenated-sequence model.

`naive_reference` runs the paper's formulation literally: one sequence [step token?, context,
candidates] under one explicit (T, T) mask. Our model splits the streams, caches the context and
skips RoPE on the self score; these tests prove that the split computes the same energies and the
same second-order training gradients, that nothing leaks between positions, and that the
Transformer++ baseline is causal.
"""

from __future__ import annotations

import pytest
import torch
from support.naive_reference import (
    cross_entropy,
    naive_energies,
    naive_step,
    naive_transformer_pp_logits,
)
from support.text import written_out_calls
from support.tolerances import gradients, relative, trainable
from torch.nn import functional as F

import ebt.models.candidate_gradient as candidate_gradient
from ebt.config import ThinkConfig, config_from_dict
from ebt.models import EnergyTransformer, TransformerPP, build_model
from ebt.thinking.loop import StepOptions, take_step
from ebt.training.objective import Objective

VARIANTS = ("time_embed", "adaln", "default", "pred_step")
VOCAB, DIM, LAYERS, HEADS, SEQ, BATCH = 13, 16, 2, 2, 6, 2
STEP_SIZE = 10.0  # small enough that y' stays in a non-saturated regime of the cross-entropy
# LOOSE catches every structural error (a wrong mask or position is O(1e-2) or worse); TIGHT is
# what a true float64 computation reaches (observed ~1e-15): the model never narrows float64.
LOOSE, LOOSE_GRAD, TIGHT, TIGHT_GRAD = 1e-5, 1e-4, 1e-10, 1e-8


def make_model(variant: str = "time_embed", kind: str = "ebt") -> torch.nn.Module:
    """A tiny float64 model built through the public config path."""
    config = config_from_dict(
        {
            "model": {
                "kind": kind,
                "variant": variant,
                "dim": DIM,
                "layers": LAYERS,
                "heads": HEADS,
            },
            "data": {"seq_len": SEQ + 2},
            "think": {"step_size": STEP_SIZE, "landscapes": 2, "steps": 1},
        }
    )
    return build_model(config, VOCAB).double()


def make_tokens(length: int = SEQ) -> torch.Tensor:
    """Random token ids (B, length) avoiding the pad id 0."""
    return torch.randint(1, VOCAB, (BATCH, length))  # (B, S)


def make_distributions(rows: int = SEQ) -> torch.Tensor:
    """Random candidate distributions (B, rows, V) in float64."""
    return torch.randn(BATCH, rows, VOCAB, dtype=torch.float64).softmax(dim=-1)  # (B, R, V)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return relative(actual, expected, floor=1e-30)


def our_energies(model: EnergyTransformer, tokens, probabilities, landscape=0, rows=None):
    """Split-stream energies (B, R): context cache, then the prediction stream."""
    return model.energies(model.encode_context(tokens, landscape), probabilities, rows)


def worst_gradient_error(ours: dict, theirs: dict) -> tuple[float, str]:
    """Largest relative error over parameters (parameters with all-zero gradients must agree)."""
    worst, where = 0.0, ""
    for name, expected in theirs.items():
        if expected.abs().max() == 0:
            assert ours[name].abs().max() == 0, name
            continue
        error = relative_error(ours[name], expected)
        if error > worst:
            worst, where = error, name
    return worst, where


# --- energies: split streams == one concatenated sequence -------------------------------------


@pytest.mark.parametrize("landscape", [0, 1])
@pytest.mark.parametrize("variant", VARIANTS)
def test_energies_match_naive_concatenated_sequence(variant, landscape):
    """Our cached two-stream energies equal the naive (T, T)-mask computation."""
    model, tokens, probabilities = make_model(variant), make_tokens(), make_distributions()
    ours = our_energies(model, tokens, probabilities, landscape)  # (B, S)
    expected = naive_energies(model, tokens, probabilities, landscape)  # (B, S)
    assert ours.shape == (BATCH, SEQ)
    assert relative_error(ours, expected) < LOOSE


@pytest.mark.parametrize("variant", VARIANTS)
def test_energies_match_naive_to_float64_precision(variant):
    """In float64 the split streams should agree with the naive model to ~1e-15."""
    model, tokens, probabilities = make_model(variant), make_tokens(), make_distributions()
    ours = our_energies(model, tokens, probabilities, 1)  # (B, S)
    assert relative_error(ours, naive_energies(model, tokens, probabilities, 1)) < TIGHT


def test_landscapes_condition_only_the_conditioned_variants():
    """default ignores the landscape; every other variant's energies depend on it."""
    tokens, probabilities = make_tokens(), make_distributions()
    for variant in VARIANTS:
        model = make_model(variant)
        first = our_energies(model, tokens, probabilities, 0)  # (B, S)
        second = our_energies(model, tokens, probabilities, 1)  # (B, S)
        assert torch.equal(first, second) == (variant == "default"), variant


@pytest.fixture(params=["one chunk", "rows split"])
def row_split(request, monkeypatch):
    """Run the hand-written passes with the candidate rows in one chunk, or split in two (as for
    long sequences; here from 2 rows on, so the tests' short sequences are split too)."""
    split = request.param == "rows split"
    monkeypatch.setattr(candidate_gradient, "SPLIT_MIN_ROWS", 2 if split else 10**9)
    return split


# --- second-order training gradients ----------------------------------------------------------


def our_step_loss(model, tokens, targets, init, landscape=0, path="hand_written") -> torch.Tensor:
    """Cross-entropy of y' after one thinking step with second-order terms (our path): the
    written-out candidate gradient differentiated by autograd, or autograd's double backward."""
    model.hand_written_gradients = path == "hand_written"
    cache = model.encode_context(tokens, landscape)
    options = StepOptions(step_size=model.step_size, create_graph=True)
    state, _ = take_step(model, cache, init.clone().requires_grad_(), options, keep_graph=True)
    return F.cross_entropy(state.flatten(0, 1), targets.flatten())  # (B, S, V) -> scalar


def naive_step_loss(model, tokens, targets, init, landscape=0) -> torch.Tensor:
    """The same loss through the naive concatenated model."""
    state, _ = naive_step(model, tokens, init, landscape)  # (B, S, V)
    return cross_entropy(state, targets)


def step_problem(variant: str):
    """(model, tokens, targets, init logits) for one thinking-step loss."""
    model, sequence = make_model(variant), make_tokens(SEQ + 1)
    init = torch.randn(BATCH, SEQ, VOCAB, dtype=torch.float64)  # (B, S, V)
    return model, sequence[:, :-1], sequence[:, 1:], init


PATHS = ("hand_written", "autograd")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_loss_and_second_order_gradients_match_naive(variant, path, monkeypatch):
    """take_step with create_graph: loss and every parameter gradient equal the naive path;
    the hand-written path did run (recorded by autograd), the autograd path did not."""
    model, tokens, targets, init = step_problem(variant)
    calls = written_out_calls(monkeypatch)
    ours = our_step_loss(model, tokens, targets, init, landscape=1, path=path)
    assert calls == (["graph"] if path == "hand_written" else [])
    theirs = naive_step_loss(model, tokens, targets, init, landscape=1)
    assert relative_error(ours, theirs) < LOOSE
    error, name = worst_gradient_error(gradients(ours, model), gradients(theirs, model))
    assert error < LOOSE_GRAD, name


@pytest.mark.usefixtures("row_split")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_second_order_gradients_match_naive_to_float64_precision(variant, path, monkeypatch):
    """In float64 the second-order parameter gradients should agree to ~1e-8 relative (the
    path asked for is the one that ran)."""
    model, tokens, targets, init = step_problem(variant)
    calls = written_out_calls(monkeypatch)
    ours = gradients(our_step_loss(model, tokens, targets, init, path=path), model)
    assert calls == (["graph"] if path == "hand_written" else [])
    theirs = gradients(naive_step_loss(model, tokens, targets, init), model)
    error, name = worst_gradient_error(ours, theirs)
    assert error < TIGHT_GRAD, name


def naive_system1_loss(model, tokens, targets, init) -> torch.Tensor:
    """The paper's S1 recipe, naively: one step per landscape, detach between, mean of CEs."""
    state, losses = init, []
    for landscape in range(2):
        state, _ = naive_step(model, tokens, state.detach(), landscape)  # (B, S, V)
        losses.append(cross_entropy(state, targets))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("variant", VARIANTS)
def test_think_uses_the_step_embedding_of_each_landscape(variant):
    """model.think over 2 landscapes: step k's energies are those on landscape k."""
    model, tokens = make_model(variant), make_tokens()
    init = torch.randn(BATCH, SEQ, VOCAB, dtype=torch.float64)  # (B, S, V)
    trajectory = model.think(tokens, init=init)
    assert trajectory.landscapes == [0, 1]
    starts = [init, trajectory.states[0]]
    for landscape, (start, energies) in enumerate(zip(starts, trajectory.energies, strict=True)):
        expected = naive_energies(model, tokens, start.softmax(dim=-1), landscape)  # (B, S)
        assert relative_error(energies, expected) < LOOSE, landscape


@pytest.mark.parametrize("variant", VARIANTS)
def test_objective_system1_matches_naive_recipe(variant, monkeypatch):
    """The full training Objective (fixed init) equals the naive S1 loss and its gradients."""
    model, tokens, targets, init = step_problem(variant)
    monkeypatch.setattr("ebt.modalities.text.task.initial_state", lambda *args: init.clone())
    think = ThinkConfig(landscapes=2, steps=1, step_size=STEP_SIZE)
    objective = Objective(model, think).train()
    ours = objective(torch.cat((tokens, targets[:, -1:]), dim=1)).loss
    theirs = naive_system1_loss(model, tokens, targets, init)
    assert relative_error(ours.double(), theirs) < LOOSE
    error, name = worst_gradient_error(gradients(ours, model), gradients(theirs, model))
    assert error < LOOSE_GRAD, name


# --- no leakage between positions -------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_future_context_tokens_do_not_leak(variant):
    """Changing x_k changes no E_j with j < k (and does change E_k: the test has teeth)."""
    model, tokens, probabilities = make_model(variant), make_tokens(), make_distributions()
    base = our_energies(model, tokens, probabilities, 1)  # (B, S)
    for k in range(1, SEQ):
        changed = tokens.clone()
        changed[:, k] = changed[:, k] % (VOCAB - 1) + 1  # another non-pad token
        energies = our_energies(model, changed, probabilities, 1)  # (B, S)
        torch.testing.assert_close(energies[:, :k], base[:, :k], rtol=0, atol=1e-12)
        assert (energies[:, k] - base[:, k]).abs().min() > 1e-9


@pytest.mark.parametrize("variant", VARIANTS)
def test_other_candidates_do_not_leak(variant):
    """Changing y_k changes E_k only."""
    model, tokens, probabilities = make_model(variant), make_tokens(), make_distributions()
    cache = model.encode_context(tokens, 0)
    base = model.energies(cache, probabilities)  # (B, S)
    for k in range(SEQ):
        changed = probabilities.clone()
        changed[:, k] = make_distributions(1)[:, 0]
        energies = model.energies(cache, changed)  # (B, S)
        others = [j for j in range(SEQ) if j != k]
        torch.testing.assert_close(energies[:, others], base[:, others], rtol=0, atol=1e-12)
        assert (energies[:, k] - base[:, k]).abs().min() > 1e-9


@pytest.mark.parametrize("variant", VARIANTS)
def test_candidate_jacobian_is_block_diagonal(variant):
    """d(sum E)/dy_j equals dE_j/dy_j: the Jacobian dE/dp has no cross-position entries."""
    model, tokens, probabilities = make_model(variant), make_tokens(), make_distributions()
    cache = model.encode_context(tokens, 0)
    jacobian = torch.autograd.functional.jacobian(
        lambda p: model.energies(cache, p), probabilities
    )  # (B, S, B, S, V)
    own = torch.eye(BATCH * SEQ, dtype=torch.bool).reshape(BATCH, SEQ, BATCH, SEQ, 1)
    assert jacobian.masked_select(~own.expand_as(jacobian)).abs().max() == 0
    probabilities = probabilities.clone().requires_grad_()
    energies = model.energies(cache, probabilities)  # (B, S)
    (summed,) = torch.autograd.grad(energies.sum(), probabilities)  # (B, S, V)
    diagonal = torch.einsum("bsbsv->bsv", jacobian)  # (B, S, V): dE_j / dy_j
    torch.testing.assert_close(summed, diagonal, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", VARIANTS)
def test_energy_j_depends_only_on_prefix_and_own_candidate(variant):
    """For every j: inputs agreeing on (x_0..x_j, y_j) and differing everywhere else give
    the same E_j; the context cache is the same whatever the candidates are."""
    model, tokens, probabilities = make_model(variant), make_tokens(), make_distributions()
    cache = model.encode_context(tokens, 1)
    snapshot = [t.clone() for t in cache.keys + cache.values]
    base = model.energies(cache, probabilities)  # (B, S)
    for j in range(SEQ):
        tokens_j, probabilities_j = make_tokens(), make_distributions()
        tokens_j[:, : j + 1] = tokens[:, : j + 1]
        probabilities_j[:, j] = probabilities[:, j]
        energies = our_energies(model, tokens_j, probabilities_j, 1)  # (B, S)
        torch.testing.assert_close(energies[:, j], base[:, j], rtol=0, atol=1e-12)
        model.energies(cache, make_distributions())  # other candidates on the same cache
    for before, after in zip(snapshot, cache.keys + cache.values, strict=True):
        assert torch.equal(before, after)  # the cache is never written by the prediction stream


# --- rows: a subset of candidates against the full cache --------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows", [[SEQ - 1], [4, 0, 2]])
def test_rows_subset_equals_columns_of_full_computation(variant, rows):
    """energies(cache, p[:, rows], rows) == energies(cache, p)[:, rows] (generation uses [-1])."""
    model, tokens, probabilities = make_model(variant), make_tokens(), make_distributions()
    cache = model.encode_context(tokens, 1)
    index = torch.tensor(rows)
    full = model.energies(cache, probabilities)  # (B, S)
    subset = model.energies(cache, probabilities[:, index], index)  # (B, R)
    assert relative_error(subset, full[:, index]) < LOOSE  # float32 internals: shapes round


@pytest.mark.usefixtures("row_split")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows", [None, [4, 0, 2]])
def test_hand_written_first_order_gradient_equals_autograd_of_the_naive_model(
    variant, rows, monkeypatch
):
    """Inference's autograd-free (energies, dE/dp), which did run, equals autograd through the
    naive concatenated model, in float64, for all rows or a subset, on a landscape of its own."""
    model, tokens, probabilities = make_model(variant), make_tokens(), make_distributions()
    calls = written_out_calls(monkeypatch)
    with torch.no_grad():  # a non-trivial adaLN modulation (its default init is near identity)
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    index = torch.arange(SEQ) if rows is None else torch.tensor(rows)
    cache = model.encode_context(tokens, 1)
    energies, gradient = model.energies_and_gradient(cache, probabilities[:, index], index, 1)
    expected_probabilities = probabilities.clone().requires_grad_()
    expected = naive_energies(model, tokens, expected_probabilities, 1)  # (B, S)
    (expected_gradient,) = torch.autograd.grad(expected.sum(), expected_probabilities)
    assert calls == ["inference"]
    assert not energies.requires_grad and not gradient.requires_grad
    assert relative_error(energies, expected[:, index]) < TIGHT
    assert relative_error(gradient, expected_gradient[:, index]) < TIGHT_GRAD


def test_casting_the_model_to_bf16_keeps_the_rope_rotations_complex():
    """model.to(torch.bfloat16) must not cast the RoPE tables to real: energies stay close."""
    model, tokens, probabilities = make_model("time_embed"), make_tokens(), make_distributions()
    model.float()
    expected = model.energies(model.encode_context(tokens, 0), probabilities.float())
    model.to(torch.bfloat16)
    cache = model.encode_context(tokens, 0)
    energies = model.energies(cache, probabilities.to(torch.bfloat16))
    assert relative_error(energies.double(), expected.double()) < 0.05


def test_first_order_gradient_falls_back_to_autograd_in_bf16(monkeypatch):
    """bf16 has no hand-written path (it is not called): the result is autograd's, bit for bit."""
    model = make_model("time_embed").to(torch.bfloat16)
    tokens, probabilities = make_tokens(), make_distributions().to(torch.bfloat16)
    cache = model.encode_context(tokens, 0)
    calls = written_out_calls(monkeypatch)
    _, gradient = model.energies_and_gradient(cache, probabilities)
    assert calls == []
    probabilities.requires_grad_()
    (expected,) = torch.autograd.grad(model.energies(cache, probabilities).sum(), probabilities)
    assert gradient.dtype == torch.bfloat16
    assert torch.equal(gradient, expected)


# --- finite differences through one thinking step ---------------------------------------------

PROBED = {  # one scalar entry of each kind of parameter the second-order terms flow through
    "blocks.0.attention.wq.weight": (1, 2),
    "blocks.1.attention.wk.weight": (3, 0),
    "blocks.0.feed_forward.w1.weight": (2, 5),
    "candidate_projection.weight": (4, 7),
    "token_embedding.weight": (None, 1),  # row: a token of the input
    "step_embedding.weight": (0, 3),
    "step_size": (),
}


def probed_entries(tokens: torch.Tensor) -> list[tuple[str, tuple]]:
    """PROBED with the token-embedding row set to a token that occurs in tokens (B, S)."""
    row = int(tokens[0, 1])
    return [(name, (row, 1) if entry == (None, 1) else entry) for name, entry in PROBED.items()]


def central_difference(model, problem, name: str, entry: tuple, h: float) -> float:
    """(L(theta + h) - L(theta - h)) / 2h for one entry of one parameter, L = our step loss."""
    parameter = trainable(model)[name]
    value = parameter.data[entry].item()
    losses = []
    for delta in (h, -h):
        parameter.data[entry] = value + delta
        losses.append(our_step_loss(model, *problem).item())
    parameter.data[entry] = value
    return (losses[0] - losses[1]) / (2 * h)


def richardson(model, problem, name: str, entry: tuple, h: float) -> float:
    """Central differences extrapolated to O(h^4): (4 D(h/2) - D(h)) / 3."""
    coarse = central_difference(model, problem, name, entry, h)
    fine = central_difference(model, problem, name, entry, h / 2)
    return (4 * fine - coarse) / 3


@pytest.mark.parametrize("variant", ["time_embed", "pred_step", "adaln"])
def test_step_gradient_matches_finite_differences(variant):
    """d(CE after one step)/d theta by autograd equals extrapolated central differences.

    The step is wide (h = 1e-2, error O(h^4)) and the tolerance loose (observed <= 1.3e-3)
    because the model's float32 internals put ~1e-6 noise on the loss. Every probed entry but
    alpha gets its gradient only through dE/dp, i.e. only through the second-order terms.
    """
    model, *problem = step_problem(variant)
    grads = gradients(our_step_loss(model, *problem), model)
    for name, entry in probed_entries(problem[0]):
        analytic = grads[name][entry].item()
        numeric = richardson(model, problem, name, entry, 1e-2)
        assert abs(analytic) > 1e-4, name
        assert analytic == pytest.approx(numeric, rel=5e-3), name


@pytest.mark.parametrize("variant", ["time_embed", "pred_step"])
def test_step_gradient_matches_fine_finite_differences(variant):
    """With a true float64 model, plain central differences at h = 1e-5 agree to ~1e-7."""
    model, *problem = step_problem(variant)
    grads = gradients(our_step_loss(model, *problem), model)
    for name, entry in probed_entries(problem[0]):
        numeric = central_difference(model, problem, name, entry, 1e-5)
        assert grads[name][entry].item() == pytest.approx(numeric, rel=1e-7, abs=1e-9), name


# --- Transformer++ baseline -------------------------------------------------------------------


def test_transformer_pp_is_causal():
    """Changing token k leaves the logits of positions < k unchanged and changes position k."""
    model, tokens = make_model(kind="transformer_pp"), make_tokens()
    assert isinstance(model, TransformerPP)
    base = model(tokens)  # (B, S, V)
    for k in range(1, SEQ):
        changed = tokens.clone()
        changed[:, k] = changed[:, k] % (VOCAB - 1) + 1
        logits = model(changed)  # (B, S, V)
        torch.testing.assert_close(logits[:, :k], base[:, :k], rtol=0, atol=1e-12)
        assert (logits[:, k] - base[:, k]).abs().max() > 1e-9


def test_transformer_pp_matches_naive_full_mask():
    """Transformer++ logits and parameter gradients equal a naive full-mask decoder."""
    model, sequence = make_model(kind="transformer_pp"), make_tokens(SEQ + 1)
    tokens, targets = sequence[:, :-1], sequence[:, 1:]
    ours, theirs = model(tokens), naive_transformer_pp_logits(model, tokens)  # (B, S, V)
    assert relative_error(ours, theirs) < LOOSE
    our_loss = F.cross_entropy(ours.flatten(0, 1), targets.flatten())
    error, name = worst_gradient_error(
        gradients(our_loss, model), gradients(cross_entropy(theirs, targets), model)
    )
    assert error < LOOSE_GRAD, name


def test_transformer_pp_matches_naive_to_float64_precision():
    """In float64 the baseline should agree with the naive decoder to ~1e-15."""
    model, tokens = make_model(kind="transformer_pp"), make_tokens()
    assert relative_error(model(tokens), naive_transformer_pp_logits(model, tokens)) < TIGHT


def test_row_chunks_read_every_key_their_rows_may_read_and_no_more():
    """The first half of the rows reads exactly the keys its last row may read."""
    assert candidate_gradient.row_chunks(128, 128, 1) == [(64, 64), (64, 128)]
    assert candidate_gradient.row_chunks(128, 129, 2) == [(64, 65), (64, 129)]
    assert candidate_gradient.row_chunks(8, 8, 1) == [(8, 8)]  # short: one chunk
