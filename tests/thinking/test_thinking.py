"""Thinking knobs (System 1 / System 2) behave as the paper's code does (facts file 1.5-1.7, 9)."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from support.text import written_out_calls

import ebt.models.candidate_gradient as candidate_gradient
import ebt.training.objective as objective_module
from ebt.config import Config, ThinkConfig, finalize, load_config
from ebt.models import EnergyTransformer, build_model
from ebt.thinking.loop import StepOptions, ThinkingError, step_schedule, take_step, think
from ebt.training.objective import Objective, training_step_size
from ebt.training.replay import ReplayBuffer

VOCAB, BATCH, LENGTH = 257, 2, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(variant: str = "pred_step", **think: object) -> EnergyTransformer:
    """A 1-layer, width-16 EBT over the byte vocabulary; `think` sets ThinkConfig fields."""
    config = Config()
    config.model.dim, config.model.layers, config.model.heads = 16, 1, 2
    config.model.variant = variant
    config.data.seq_len = LENGTH
    for key, value in think.items():
        setattr(config.think, key, value)
    torch.manual_seed(0)
    return build_model(finalize(config), VOCAB)


def tiny_objective(**think: object) -> Objective:
    """An Objective over `tiny_model` whose ThinkConfig carries the same `think` fields."""
    model = tiny_model(**think)
    return Objective(model, ThinkConfig(**think))


def tokens(batch: int = BATCH, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length))


def noise(batch: int = BATCH, length: int = LENGTH) -> torch.Tensor:
    return torch.randn(batch, length, VOCAB)


def weights(model: EnergyTransformer) -> list[torch.nn.Parameter]:
    """Trainable parameters other than the step size (which enters every update linearly)."""
    return [p for name, p in model.named_parameters() if p.requires_grad and name != "step_size"]


def record_think(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Patch the Objective's `think` to record its init and options; returns the records."""
    calls: list[dict] = []

    def recording(model, inputs, init, schedule, options, rows=None):
        calls.append({"init": init.clone(), "options": options, "schedule": schedule})
        return think(model, inputs, init, schedule, options, rows)

    monkeypatch.setattr(objective_module, "think", recording)
    return calls


class LinearEnergy:
    """E(p) = sum_v p_v * weight_v per position, so dE/dp = weight exactly."""

    context_depends_on_landscape = False

    def __init__(self, weight: torch.Tensor, step_size: float) -> None:
        self.weight = weight
        self.step_size = torch.tensor(step_size)

    def encode_context(self, tokens: torch.Tensor, landscape: int = 0) -> SimpleNamespace:
        return SimpleNamespace(landscape=landscape)

    def candidate_input(self, state: torch.Tensor) -> torch.Tensor:
        return state.softmax(dim=-1)

    def energies(self, cache, probabilities: torch.Tensor, rows=None, landscape=None):
        return (probabilities * self.weight).sum(-1)


# --- step schedule -------------------------------------------------------------------------


def test_schedule_without_random_steps_repeats_each_landscape():
    """R = 0: `steps` steps on every landscape, in training and at evaluation alike."""
    for randomize in (False, True):
        assert step_schedule(3, steps=2, randomize=randomize) == [0, 0, 1, 1, 2, 2]
    assert step_schedule(2) == [0, 1]


def _counts(schedule: list[int], landscapes: int) -> list[int]:
    counts = Counter(schedule)
    return [counts[landscape] for landscape in range(landscapes)]


@pytest.mark.parametrize(("low", "expected"), [(0, {1, 2, 3}), (2, {2, 3})])
def test_schedule_random_steps_in_training(low, expected):
    """R > 0 in training: each landscape independently gets randint(min, R + 2) steps."""
    draws = [
        _counts(step_schedule(2, random_steps=2, random_steps_min=low, randomize=True), 2)
        for _ in range(300)
    ]
    for landscape in range(2):
        assert {counts[landscape] for counts in draws} == expected
    assert any(first != second for first, second in draws)  # one draw per landscape


def test_schedule_random_steps_is_ordered_and_seeded():
    """Landscapes come in order, and the draws use torch's global generator."""
    torch.manual_seed(5)
    first = [step_schedule(3, random_steps=3, randomize=True) for _ in range(20)]
    torch.manual_seed(5)
    assert first == [step_schedule(3, random_steps=3, randomize=True) for _ in range(20)]
    assert all(schedule == sorted(schedule) for schedule in first)


def test_schedule_final_landscape_only():
    """final_landscape_only: earlier landscapes take one step, the last randint(min, R+2)."""
    draws = [
        _counts(step_schedule(3, random_steps=2, final_landscape_only=True, randomize=True), 3)
        for _ in range(200)
    ]
    assert {tuple(counts[:2]) for counts in draws} == {(1, 1)}
    assert {counts[2] for counts in draws} == {1, 2, 3}


def test_schedule_random_steps_at_evaluation():
    """R > 0 at evaluation: earlier landscapes once, the last R + 1 times (deterministic)."""
    assert step_schedule(3, random_steps=2, random_steps_min=2) == [0, 1, 2, 2, 2]
    assert step_schedule(1, random_steps=2, random_steps_min=2) == [0, 0, 0]


def test_objective_uses_random_schedule_only_in_training():
    """Objective: training draws the step count, evaluation takes the deterministic R + 1."""
    objective = tiny_objective(landscapes=1, random_steps=2, random_steps_min=2)
    batch = torch.randint(1, VOCAB, (BATCH, LENGTH + 1))
    lengths = {len(objective.train()(batch).metrics["loss_per_step"]) for _ in range(12)}
    assert lengths == {2, 3}
    assert len(objective.eval()(batch).metrics["loss_per_step"]) == 3


# --- step size -----------------------------------------------------------------------------


def test_random_step_size_is_per_token_uniform_in_training():
    """s != 1 in training: alpha ~ U[alpha/s, alpha*s] with one value per (batch, position)."""
    model = tiny_model(step_size=5.0)
    sizes = training_step_size(model, ThinkConfig(step_size_random_scale=2.0), (64, 32, 1), True)
    assert sizes.shape == (64, 32, 1)
    assert sizes.min() >= 2.5 and sizes.max() <= 10.0
    assert sizes.min() < 2.6 and sizes.max() > 9.9 and abs(sizes.mean() - 6.25) < 0.2


def test_step_size_is_the_scalar_alpha_at_evaluation():
    """No randomisation at evaluation, nor in training when s = 1."""
    model = tiny_model(step_size=5.0)
    scaled = ThinkConfig(step_size_random_scale=2.0)
    assert training_step_size(model, scaled, (BATCH, LENGTH), False).shape == ()
    assert training_step_size(model, scaled, (BATCH, LENGTH), False).item() == 5.0
    assert training_step_size(model, ThinkConfig(), (BATCH, LENGTH), True).item() == 5.0


def test_objective_passes_per_token_step_size_only_in_training(monkeypatch):
    """Objective: (B, S, 1) step sizes in training, the scalar alpha in eval mode."""
    calls = record_think(monkeypatch)
    objective = tiny_objective(step_size=5.0, step_size_random_scale=2.0)
    batch = torch.randint(1, VOCAB, (BATCH, LENGTH + 1))
    objective.train()(batch)
    objective.eval()(batch)
    assert calls[0]["options"].step_size.shape == (BATCH, LENGTH, 1)
    assert calls[1]["options"].step_size.shape == ()


def test_step_size_is_clamped_at_1e_4():
    """alpha is clamped at 1e-4 before use (and before randomisation)."""
    model = tiny_model()
    with torch.no_grad():
        model.step_size.fill_(-3.0)
    assert training_step_size(model, ThinkConfig(), (1, 1), False).item() == pytest.approx(1e-4)
    sizes = training_step_size(model, ThinkConfig(step_size_random_scale=2.0), (4, 4), True)
    assert sizes.min() >= 0.5e-4 - 1e-9 and sizes.max() <= 2e-4 + 1e-9


# --- Langevin noise ------------------------------------------------------------------------


def test_langevin_noise_makes_thinking_stochastic():
    """sigma > 0: two runs from the same init differ; sigma = 0: identical."""
    model, context, init = tiny_model(), tokens(), noise()
    noisy = [model.think(context, init, langevin_noise=0.5).states[-1] for _ in range(2)]
    clean = [model.think(context, init, langevin_noise=0.0).states[-1] for _ in range(2)]
    assert not torch.equal(*noisy)
    assert torch.equal(*clean)


def test_trained_langevin_sigma_is_the_inference_default():
    """A model trained with noise (S2, sigma = 3) keeps adding it when thinking by default."""
    model, context, init = tiny_model(langevin_noise=3.0), tokens(), noise()
    first, second = (model.think(context, init).states[-1] for _ in range(2))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("sigma", [0.0, 3.0])
def test_langevin_noise_is_applied_at_evaluation(sigma):
    """Eval mode still adds the noise (paper behaviour for text): zero init, two seeds."""
    objective = tiny_objective(langevin_noise=sigma, init="zeros").eval()
    batch = torch.randint(1, VOCAB, (BATCH, LENGTH + 1))
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(objective(batch).metrics["loss_per_step"])
    assert torch.equal(*losses) == (sigma == 0.0)


# --- graph handling ------------------------------------------------------------------------


def test_truncated_loss_is_the_final_step_loss():
    """truncate: loss == CE of the last step only."""
    objective = tiny_objective(landscapes=1, steps=3, truncate=True).train()
    metrics = objective(torch.randint(1, VOCAB, (BATCH, LENGTH + 1))).metrics
    assert len(metrics["loss_per_step"]) == 3
    assert metrics["loss"].item() == pytest.approx(metrics["loss_per_step"][-1].item())


def test_untruncated_loss_is_the_mean_of_step_losses():
    """No truncation (S1): loss == mean of the per-step CEs, and it carries a graph."""
    objective = tiny_objective(landscapes=2, steps=2).train()
    output = objective(torch.randint(1, VOCAB, (BATCH, LENGTH + 1)))
    per_step = output.metrics["loss_per_step"]
    assert len(per_step) == 4
    assert output.loss.item() == pytest.approx(per_step.mean().item(), rel=1e-6)
    assert output.loss.requires_grad


def _training_trajectory(model, init, truncate: bool, detach: bool, steps: int = 3):
    options = StepOptions(
        step_size=model.step_size, create_graph=True, truncate=truncate, detach=detach
    )
    return think(model, tokens(), init, step_schedule(1, steps), options)


def _reaches(output: torch.Tensor, inputs: list[torch.Tensor]) -> list[bool]:
    """Which of `inputs` the graph of `output` depends on."""
    grads = torch.autograd.grad(output.sum(), inputs, retain_graph=True, allow_unused=True)
    return [grad is not None and bool(grad.abs().sum() > 0) for grad in grads]


def test_truncate_keeps_second_order_terms_only_on_the_last_step():
    """truncate + no detach (S2): earlier states do not depend on the weights, the last does."""
    model = tiny_model(landscapes=1, step_size_learnable=False)
    trajectory = _training_trajectory(model, noise(), truncate=True, detach=False)
    for state in trajectory.states[:-1]:
        assert not any(_reaches(state, weights(model)))
    assert any(_reaches(trajectory.states[-1], weights(model)))


def test_without_truncate_every_step_has_second_order_terms():
    """No truncation: every step's state depends on the weights through dE/dp."""
    model = tiny_model(landscapes=1)
    trajectory = _training_trajectory(model, noise(), truncate=False, detach=True)
    for state in trajectory.states:
        assert any(_reaches(state, weights(model)))


def test_no_detach_backpropagates_through_the_whole_chain():
    """detach=False: the final state's graph reaches the initial state and earlier states."""
    model = tiny_model(landscapes=1)
    init = noise().requires_grad_()
    states = _training_trajectory(model, init, truncate=False, detach=False).states
    assert _reaches(states[-1], [init, states[0]]) == [True, True]


def test_detach_cuts_the_graph_between_steps():
    """detach=True (S1): the final state's graph reaches neither the init nor earlier states."""
    model = tiny_model(landscapes=1)
    init = noise().requires_grad_()
    states = _training_trajectory(model, init, truncate=False, detach=True).states
    assert _reaches(states[-1], [init, states[0]]) == [False, False]
    assert any(_reaches(states[-1], weights(model)))


def test_inference_states_carry_no_graph():
    """At inference (create_graph off) every returned state is detached."""
    trajectory = tiny_model().think(tokens())
    assert not any(state.requires_grad for state in trajectory.states)


# --- clamps --------------------------------------------------------------------------------


def _one_step(model: LinearEnergy, init: torch.Tensor, **options: float) -> torch.Tensor:
    step = StepOptions(step_size=model.step_size, **options)
    new_state, _ = take_step(model, None, init.requires_grad_(), step, keep_graph=False)
    return new_state.detach()


def test_grad_clamp_limits_the_gradient_to_clamp_over_alpha():
    """grad_clamp c: dE/dp is clipped to +-c/alpha, so no coordinate moves more than c."""
    weight = torch.tensor([-10.0, -0.1, 0.1, 10.0])
    model, init = LinearEnergy(weight, step_size=2.0), torch.randn(BATCH, LENGTH, 4)
    probabilities = init.softmax(-1)
    new_state = _one_step(model, init.clone(), grad_clamp=1.0)
    clipped = torch.tensor([-0.5, -0.1, 0.1, 0.5])
    assert torch.allclose(new_state, probabilities - 2.0 * clipped)
    unclamped = _one_step(model, init.clone())
    assert torch.allclose(unclamped, probabilities - 2.0 * weight)


def test_absolute_clamp_bounds_the_state():
    """absolute_clamp a: the new state lies in [-a, a] even for a huge gradient."""
    weight = torch.tensor([-100.0, 0.0, 100.0])
    model, init = LinearEnergy(weight, step_size=10.0), torch.randn(BATCH, LENGTH, 3)
    new_state = _one_step(model, init, absolute_clamp=2.0)
    assert new_state.abs().max().item() == pytest.approx(2.0)
    assert torch.all(new_state[..., 0] == 2.0) and torch.all(new_state[..., 2] == -2.0)


def test_objective_applies_the_configured_clamps(monkeypatch):
    """think.grad_clamp and think.absolute_clamp reach every step of the objective."""
    calls = record_think(monkeypatch)
    objective = tiny_objective(grad_clamp=0.5, absolute_clamp=1.5).train()
    output = objective(torch.randint(1, VOCAB, (BATCH, LENGTH + 1)))
    assert (calls[0]["options"].grad_clamp, calls[0]["options"].absolute_clamp) == (0.5, 1.5)
    assert output.final_state.abs().max() <= 1.5


# --- NaN guard -----------------------------------------------------------------------------


def _poison_step(monkeypatch: pytest.MonkeyPatch, model: EnergyTransformer, bad: int) -> None:
    """Make the model's energies (and, at inference, its hand-written first-order gradient)
    NaN on the `bad`-th energy evaluation (0-based)."""
    calls = []

    def poisoned(real):
        def evaluate(cache, probabilities, rows=None, landscape=None, *extra):
            calls.append(None)
            result = real(cache, probabilities, rows, landscape, *extra)
            if len(calls) != bad + 1:
                return result
            return (
                tuple(r * math.nan for r in result)
                if isinstance(result, tuple)
                else result * math.nan
            )

        return evaluate

    for name in ("energies", "energies_and_gradient"):
        monkeypatch.setattr(model, name, poisoned(getattr(model, name)))


def test_nan_gradient_raises_thinking_error_naming_the_step(monkeypatch):
    """A NaN energy at step 1 raises ThinkingError that says 'step 1' (inference)."""
    model = tiny_model()
    _poison_step(monkeypatch, model, bad=1)
    with pytest.raises(ThinkingError, match=r"step 1\b"):
        model.think(tokens())


def test_nan_in_training_raises_thinking_error(monkeypatch):
    """The same guard fires inside the training objective (second-order graph on)."""
    objective = tiny_objective(landscapes=1, steps=3).train()
    _poison_step(monkeypatch, objective.model, bad=2)
    with pytest.raises(ThinkingError, match=r"step 2\b"):
        objective(torch.randint(1, VOCAB, (BATCH, LENGTH + 1)))


# --- replay buffer -------------------------------------------------------------------------


def _records(count: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` distinguishable (tokens (S+1,), state (S, V)) records numbered from `start`."""
    ids = torch.arange(start, start + count).float()
    token_rows = ids[:, None].long().expand(count, LENGTH + 1).clone()
    states = ids[:, None, None].expand(count, LENGTH, 5).clone()
    return token_rows, states


def test_empty_replay_buffer_returns_the_fresh_batch():
    buffer = ReplayBuffer(max_size=8, sample_size=2)
    fresh = _records(4)[0]
    batch, states = buffer.extend_batch(fresh)
    assert batch is fresh and states is None


@pytest.mark.parametrize(("stored", "expected"), [(1, 1), (2, 2), (6, 3)])
def test_replay_sample_size_is_min_of_sample_and_len(stored, expected):
    """min(fraction * B, len(buffer)) rows are replayed, appended after the fresh rows."""
    buffer = ReplayBuffer(max_size=8, sample_size=3)
    buffer.update(*_records(stored, start=100))
    fresh = _records(4)[0]
    batch, states = buffer.extend_batch(fresh)
    assert batch.shape == (4 + expected, LENGTH + 1) and states.shape == (expected, LENGTH, 5)
    assert torch.equal(batch[:4], fresh)
    replayed = batch[4:, 0]
    assert len(set(replayed.tolist())) == expected and bool((replayed >= 100).all())
    assert torch.equal(states[:, 0, 0].long(), replayed)  # each state with its own tokens


def test_replay_buffer_is_fifo():
    """Beyond max_size the oldest records are dropped first."""
    buffer = ReplayBuffer(max_size=3, sample_size=3)
    buffer.update(*_records(5))
    assert len(buffer) == 3
    assert [row[0].item() for row in buffer.tokens] == [2, 3, 4]
    assert [state[0, 0].item() for state in buffer.states] == [2.0, 3.0, 4.0]


def test_replay_buffer_state_dict_round_trip():
    buffer, copy = ReplayBuffer(8, 2), ReplayBuffer(8, 2)
    buffer.update(*_records(5))
    copy.load_state_dict(buffer.state_dict())
    assert len(copy) == 5
    assert all(torch.equal(a, b) for a, b in zip(buffer.tokens, copy.tokens, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffer.states, copy.states, strict=True))
    copy.load_state_dict(ReplayBuffer(8, 2).state_dict())
    assert len(copy) == 0


def test_objective_starts_replayed_rows_from_their_stored_states(monkeypatch):
    """Replayed rows (the last ones) start from the stored final states; fresh rows from noise."""
    calls = record_think(monkeypatch)
    objective = tiny_objective(landscapes=1).train()
    batch = torch.randint(1, VOCAB, (BATCH + 1, LENGTH + 1))
    stored = torch.randn(1, LENGTH, VOCAB) * 7
    output = objective(batch, replay_states=stored)
    init = calls[0]["init"]
    assert torch.equal(init[BATCH:], stored)
    assert not torch.equal(init[BATCH - 1], stored[0])
    assert output.final_state.shape == (BATCH + 1, LENGTH, VOCAB)


# --- model.think ---------------------------------------------------------------------------


def test_think_returns_one_state_and_energy_per_step():
    """states[k] (B, S, V) and energies[k] (B, S), one per step of the trained schedule."""
    model = tiny_model(landscapes=2, steps=1)
    trajectory = model.think(tokens(), noise())
    assert trajectory.landscapes == [0, 1]
    assert [state.shape for state in trajectory.states] == [(BATCH, LENGTH, VOCAB)] * 2
    assert [energy.shape for energy in trajectory.energies] == [(BATCH, LENGTH)] * 2


def test_think_energies_are_those_of_the_starting_state():
    """energies[0] is the energy of softmax(init) on landscape 0."""
    model, context, init = tiny_model(), tokens(), noise()
    trajectory = model.think(context, init)
    with torch.no_grad():
        expected = model.energies(model.encode_context(context, 0), init.softmax(-1))
    assert torch.allclose(trajectory.energies[0], expected, atol=1e-6)


@pytest.mark.parametrize("variant", ["pred_step", "time_embed", "adaln"])
def test_each_step_is_conditioned_on_its_own_landscape(variant):
    """Changing landscape 1's step embedding changes step 1's energies only."""
    model, context, init = tiny_model(variant, landscapes=2), tokens(), noise()
    before = model.think(context, init).energies
    with torch.no_grad():
        model.step_embedding.weight[1] += 1.0
    after = model.think(context, init).energies
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


def test_think_steps_override_is_per_landscape():
    """steps=3 on a 2-landscape model takes 6 steps, three on each landscape."""
    trajectory = tiny_model(landscapes=2).think(tokens(), steps=3)
    assert trajectory.landscapes == [0, 0, 0, 1, 1, 1]
    assert len(trajectory.states) == len(trajectory.energies) == 6


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to float32 noise relative to the largest magnitude (states reach ~1e3)."""
    return bool((got - want).abs().max() <= 1e-5 * want.abs().max())


@pytest.mark.parametrize("variant", ["pred_step", "time_embed", "adaln", "default"])
def test_think_rows_optimises_only_those_positions(variant):
    """rows: candidates (B, len(rows), V) for those positions only, equal to the full run."""
    model, context, init = tiny_model(variant), tokens(), noise()
    rows = torch.tensor([LENGTH - 1, 2])
    partial = model.think(context, init[:, rows], rows=rows)
    full = model.think(context, init)
    assert partial.states[-1].shape == (BATCH, 2, VOCAB)
    assert partial.energies[-1].shape == (BATCH, 2)
    assert _close(partial.states[-1], full.states[-1][:, rows])
    assert _close(partial.energies[-1], full.energies[-1][:, rows])


# --- landscape-wise backward ---------------------------------------------------------------

LANDSCAPEWISE_RECIPES = {
    "system1": [],
    "random steps, noise, per-token alpha": [
        "think.random_steps=2",
        "think.langevin_noise=0.1",
        "think.step_size_random_scale=2",
    ],
    "system2 (not detached: one backward)": ["think.detach=false", "think.truncate=true"],
}


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def recipe_problem(variant: str, landscapes: int, recipe: list[str]):
    """(model, training objective, batch (3, 9)) of a 2-layer width-16 EBT trained with recipe."""
    overrides = [f"model.variant={variant}", "model.dim=16", "model.layers=2", "model.heads=2"]
    overrides += ["data.seq_len=8", f"think.landscapes={landscapes}", "think.steps=2"]
    config = finalize(load_config(None, overrides + ["think.step_size=20"] + recipe))
    torch.manual_seed(0)
    model = build_model(config, 11)
    return model, Objective(model, config.think).train(), torch.randint(1, 11, (3, 9))


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("variant", ["time_embed", "pred_step", "adaln", "default"])
@pytest.mark.parametrize("recipe", list(LANDSCAPEWISE_RECIPES))
def test_landscapewise_backward_equals_one_backward(variant, recipe):
    """forward_backward (a backward per landscape, shared context and alpha cut into leaves)
    gives the gradients of backward(forward(batch).loss * scale), in float64."""
    model, objective, batch = recipe_problem(variant, 3, LANDSCAPEWISE_RECIPES[recipe])
    torch.manual_seed(1)
    objective_module.backward(objective(batch).loss * 0.5, model)
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    output = objective.forward_backward(batch, scale=0.5)
    assert objective.landscapewise() == objective.think_config.detach
    assert not output.loss.requires_grad
    actual = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert actual.keys() == expected.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(actual[name], gradient, rtol=1e-12, atol=1e-12, msg=name)


WRITTEN_OUT_RECIPES = LANDSCAPEWISE_RECIPES | {
    "system2 (not detached, every step second order, clamps)": [
        "think.detach=false",
        "think.grad_clamp=0.5",
        "think.absolute_clamp=3",
        "think.langevin_noise=0.1",
    ],
}


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("variant", ["time_embed", "pred_step", "adaln", "default"])
@pytest.mark.parametrize("recipe", list(WRITTEN_OUT_RECIPES))
def test_written_out_candidate_gradient_trains_like_double_backward(variant, recipe, monkeypatch):
    """Training with the hand-written dE/dp (a first-order graph autograd differentiates once)
    gives autograd's double-backward loss and parameter gradients, in float64, for every
    thinking knob (chains of steps without detach included); the attention's rows are split
    in two as for long sequences."""
    monkeypatch.setattr(candidate_gradient, "SPLIT_MIN_ROWS", 2)
    model, objective, batch = recipe_problem(variant, 2, WRITTEN_OUT_RECIPES[recipe])
    results, calls = {}, written_out_calls(monkeypatch)
    for hand_written in (False, True):
        model.hand_written_gradients = hand_written
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = objective.forward_backward(batch).loss
        assert bool(calls) == ("graph" in calls) == hand_written  # the path that ran
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[hand_written] = loss, grads
    (expected_loss, expected), (loss, actual) = results[False], results[True]
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    assert actual.keys() == expected.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(actual[name], gradient, rtol=1e-10, atol=1e-12, msg=name)


# bf16 autocast (CPU): the tiny S1 recipe (pred_step, 2 landscapes x 1 step of size 20). bf16 keeps
# 8 significant bits (unit roundoff 2^-9 = 2e-3); through two blocks and a step of size 20 the
# errors against float32, norm-wise, were at most: loss 1.2e-2, weight gradients 4.7e-2, thinking
# states 3.5e-2, energies 2.0e-2 (seeds 0-3; autograd's dE/dp). With the written-out dE/dp under
# autocast: loss 6.6e-3, weight gradients 4.8e-2 (batch seeds 0-3). The bounds are three times that.
BF16_BOUNDS = {"loss": 3e-2, "gradient": 0.15, "states": 0.1, "energies": 0.06}


def normwise(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    difference = actual.double() - expected.double()
    return (difference.norm() / expected.double().norm()).item()


def bf16_problem():
    """(model, training objective, batch (3, 9)) of the tiny S1 recipe in float32."""
    overrides = ["model.variant=pred_step", "model.dim=16", "model.layers=2", "model.heads=2"]
    overrides += ["data.seq_len=8", "think.landscapes=2", "think.steps=1", "think.step_size=20"]
    config = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_model(config, 11)
    return model, Objective(model, config.think).train(), torch.randint(1, 11, (3, 9))


def test_a_training_step_under_bf16_autocast_is_close_to_float32(monkeypatch):
    """Loss and weight gradients under CPU bf16 autocast within BF16_BOUNDS of float32, the
    loss and the gradients float32, with the written-out candidate gradient (it runs under
    autocast: products in bf16, softmax, norm statistics and energies in float32)."""
    model, objective, batch = bf16_problem()
    results, ran = {}, {}
    for bf16 in (False, True):
        model.zero_grad(set_to_none=True)
        calls = written_out_calls(monkeypatch)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = objective.forward_backward(batch).loss
        ran[bf16] = list(calls)  # (the next recorder wraps this one)
        results[bf16] = loss, torch.cat([p.grad.flatten() for p in weights(model)])  # (P,)
    assert ran == {False: ["graph", "graph"], True: ["graph", "graph"]}  # written out in both
    (loss32, gradient32), (loss16, gradient16) = results[False], results[True]
    assert loss16.dtype == gradient16.dtype == torch.float32
    assert torch.isfinite(loss16) and torch.isfinite(gradient16).all()
    assert abs(loss16.item() / loss32.item() - 1) < BF16_BOUNDS["loss"]
    assert normwise(gradient16, gradient32) < BF16_BOUNDS["gradient"]


def test_thinking_under_bf16_autocast_is_close_to_float32(monkeypatch):
    """model.think under CPU bf16 autocast: float32 states within BF16_BOUNDS of float32
    thinking, step by step, through the written-out candidate gradient."""
    model, _, batch = bf16_problem()
    model.eval()
    init = torch.randn(3, 8, 11)  # (B, S, V)
    expected = model.think(batch[:, :-1], init, langevin_noise=0.0)
    calls = written_out_calls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trajectory = model.think(batch[:, :-1], init, langevin_noise=0.0)
    assert calls == ["inference"] * len(trajectory.states)
    states = zip(trajectory.states, expected.states, strict=True)
    energies = zip(trajectory.energies, expected.energies, strict=True)
    for (state, state32), (energy, energy32) in zip(states, energies, strict=True):
        assert state.dtype == torch.float32 and torch.isfinite(state).all()
        assert normwise(state, state32) < BF16_BOUNDS["states"]
        assert normwise(energy, energy32) < BF16_BOUNDS["energies"]


# --- accept only lower energies ------------------------------------------------------------


def test_accept_lower_energies_keeps_a_step_only_where_it_lowers_the_energy():
    """Per position: the proposed state where its energy is below the start's, else the start's
    probabilities (the paper's rule). Per-token step sizes of both signs (descent and ascent)
    make both cases occur."""
    model = tiny_model()
    cache = model.encode_context(tokens(), 0)
    start = noise()
    signs = torch.randint(0, 2, (BATCH, LENGTH, 1)) * 2.0 - 1.0  # (B, S, 1)
    plain = StepOptions(step_size=50.0 * signs)
    guarded = StepOptions(step_size=50.0 * signs, accept_lower_energies=True)
    proposed, start_energies = take_step(model, cache, start.clone().requires_grad_(), plain, False)
    kept, _ = take_step(model, cache, start.clone().requires_grad_(), guarded, False)
    with torch.no_grad():
        lower = model.energies(cache, proposed.softmax(-1)) < start_energies  # (B, S)
    assert lower.any() and (~lower).any()
    torch.testing.assert_close(kept[lower], proposed[lower], rtol=0, atol=0)
    torch.testing.assert_close(kept[~lower], start.softmax(-1)[~lower], rtol=0, atol=0)
