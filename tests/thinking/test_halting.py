"""The one halting loop and the one best-of-N serve every candidate shape: on a quadratic energy
whose answer is known, text-shaped candidates (B, S, V) along dim 1, image-shaped ones
(B, C, H, W) and frame-shaped ones (B N, 1, F) along dim 0 halt after the same known number of
steps at the target, and best-of-N keeps the start nearest the target in every layout."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ebt.thinking.halting import halt, owned_context, shared_context
from ebt.thinking.loop import step_options, step_schedule
from ebt.thinking.selection import Selection, Thought, select, self_verify

pytestmark = pytest.mark.usefixtures("one_thread")


class Quadratic(torch.nn.Module):
    """E(x) = sum over a candidate's own dims of (x - target)^2 (everything after the first
    `lead` dims); alpha = 1/2 reaches the target in one step."""

    context_depends_on_landscape = False

    def __init__(self, target: torch.Tensor, lead: int, step_size: float = 0.5) -> None:
        super().__init__()
        self.target, self.lead = target, lead
        self.step_size = torch.nn.Parameter(torch.tensor(step_size), requires_grad=False)
        self.langevin_std = torch.nn.Parameter(torch.tensor(0.0), requires_grad=False)

    def resolve_step_size(self, step_size: float | None) -> torch.Tensor:
        return self.step_size.detach() if step_size is None else torch.tensor(step_size)

    def encode_context(self, context=None, landscape: int = 0) -> SimpleNamespace:
        return SimpleNamespace(landscape=landscape, select=lambda rows, landscape: self)

    def candidate_input(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def energies(self, cache, candidates, rows=None, landscape=None) -> torch.Tensor:
        return (candidates - self.target).pow(2).flatten(self.lead).sum(-1)  # leading dims


SHAPES = {  # name: (state shape, halting dim, energies' leading dims)
    "text": ((1, 5, 7), 1, 2),
    "image": ((5, 3, 4, 4), 0, 1),
    "frame": ((5, 1, 12), 0, 1),
}


def _halted(name: str, starts: torch.Tensor, tolerance: float = 1e-6):
    shape, dim, lead = SHAPES[name]
    model = Quadratic(torch.zeros(shape[-1]), lead)
    caches = {0: model.encode_context()}
    count = shape[dim]
    if name == "frame":
        context = owned_context(model, caches, torch.arange(count), torch.zeros(1))
    else:
        context = shared_context(model, caches, torch.arange(count))
    options = step_options(model)
    return halt(model, starts.clone(), step_schedule(1, 5), options, context, tolerance, dim=dim)


@pytest.mark.parametrize("name", list(SHAPES))
def test_one_halting_loop_stops_every_shape_at_the_known_step(name):
    """A start away from the target: step 1 reaches it, step 2 still sees the energy fall
    (E0 -> 0), step 3 sees no change and is not kept: 2 steps, 3 evaluations. A start on the
    target: step 2 sees no change: 1 step, 2 evaluations."""
    shape, dim, _ = SHAPES[name]
    starts = torch.ones(shape)
    starts.select(dim, 0).zero_()  # the first candidate starts on the target
    result = _halted(name, starts)
    assert torch.equal(result.state, torch.zeros(shape))
    assert result.steps.tolist() == [1] + [2] * (shape[dim] - 1)
    assert result.evaluations.tolist() == [2.0] + [3.0] * (shape[dim] - 1)
    assert torch.equal(result.energies, torch.zeros(shape[dim]))


@pytest.mark.parametrize("name", list(SHAPES))
def test_a_huge_tolerance_keeps_only_the_first_step(name):
    shape, dim, _ = SHAPES[name]
    result = _halted(name, torch.randn(shape), tolerance=1e12)
    assert result.steps.tolist() == [1] * shape[dim]  # the 2nd step saw |dE| < tolerance
    assert torch.equal(result.state, torch.zeros(shape))


LAYOUTS = {  # name: (states shape, energies' leading dims, energies layout, samples dim)
    "text": ((2, 3 * 4, 7), 2, (2, 3, 4), 1),  # (B, N S, V) -> (B, N, S)
    "image": ((3 * 2, 3, 4, 4), 1, (3, 2), 0),  # (N B, C, H, W) -> (N, B)
    "frame": ((2, 3, 12), 2, (2, 3), 1),  # (B, N, F) -> (B, N)
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_one_best_of_n_keeps_the_start_nearest_the_target(name):
    """Half a step (alpha 1/4) halves every start's distance, so the nearest start wins, with
    its own steps and energy."""
    shape, lead, layout, dim = LAYOUTS[name]
    model = Quadratic(torch.zeros(shape[-1]), lead, step_size=0.25)
    starts = torch.randn(shape)
    halfway = starts / 2  # one step of alpha 1/4 on (x - 0)^2
    steps = torch.arange(starts.shape[:lead].numel()).view(starts.shape[:lead])
    chosen = self_verify(model, Thought(halfway, 2.0, steps), None, None, None, layout, dim)
    own = shape[lead:]
    distances = starts.view(*layout, *own).pow(2).flatten(len(layout)).sum(-1)  # layout
    nearest = distances.argmin(dim, keepdim=True)  # layout, size 1 along dim
    index = nearest.view(*nearest.shape, *[1] * len(own)).expand(*nearest.shape, *own)
    expected = halfway.view(*layout, *own).gather(dim, index).squeeze(dim)
    torch.testing.assert_close(chosen.states, expected)
    torch.testing.assert_close(chosen.energies, distances.gather(dim, nearest).squeeze(dim) / 4)
    assert torch.equal(chosen.steps, steps.view(layout).gather(dim, nearest).squeeze(dim))
    assert chosen.passes == 2.0 * 3 + 3  # 3 samples: every evaluation, + 3 verifications


def test_sequence_and_weighted_rules_refuse_a_non_text_layout():
    energies, candidates = torch.rand(3, 2), torch.rand(3, 2, 12)
    with pytest.raises(ValueError, match="text candidates"):
        select(candidates, energies, Selection("sequence"), dim=0)
