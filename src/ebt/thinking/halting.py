"""Adaptive thinking: every candidate stops when its energy stops moving, and leaves the batch.

One loop (`halt`) serves every modality. Candidates are independent (a candidate reads only the
context and itself), so the unconverged ones are gathered into a smaller batch for the next
step: real compute saved, not a mask. A candidate halts at step k when |E_k - E_{k-1}| <
tolerance (E_k: energy of the state step k starts from; that step is not kept) or when the
gradient norm of its step falls under `grad_tolerance` (that step is kept); its answer is then
the state it had reached. The schedule is the budget.

Where a candidate's context lives is the modality's part, a `Context`: text candidates of one
sequence share its cache and each reads its own position (`shared_context`); the images have no
context; the video starts of all clips think as one batch, each against its clip's rows of the
caches (`owned_context`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ebt.thinking.loop import (
    EnergyModel,
    StepOptions,
    cache_of,
    encode_caches,
    step_options,
    step_schedule,
    take_step,
)

# (landscape, indices (A,) of the candidates still thinking) -> (the context cache they think
# against, the `rows` argument of the model's energies for them)
Context = Callable[[int, torch.Tensor], tuple[Any, torch.Tensor | None]]


@dataclass
class Halted:
    """The candidates after halting (the state's shape), per candidate along the halting dim:
    the last energy it saw (R,), the steps it kept (R,) and its energy evaluations (R,)."""

    state: torch.Tensor
    energies: torch.Tensor
    steps: torch.Tensor
    evaluations: torch.Tensor


@dataclass
class AdaptiveResult:
    logits: torch.Tensor  # (B, S, V) final raw candidates
    energies: torch.Tensor  # (B, S) last energy each token saw
    steps: torch.Tensor  # (B, S) steps each token took
    forward_passes_per_token: float  # mean energy evaluations per token


def shared_context(model: EnergyModel, caches: dict, rows: torch.Tensor | None) -> Context:
    """Candidates that read one cache per landscape (the state's batch), candidate i at context
    row rows[i] (None: a model without positions, e.g. images)."""

    def context(landscape: int, active: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        return cache_of(model, caches, landscape), None if rows is None else rows[active]

    return context


def owned_context(
    model: EnergyModel, caches: dict, owners: torch.Tensor, row: torch.Tensor
) -> Context:
    """Candidates alone in their batch row (state (R, 1, ...)): candidate i reads batch row
    owners[i] (R,) of the stacked caches, at context row `row` (1,)."""

    def context(landscape: int, active: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        cache = cache_of(model, caches, landscape)
        return cache.select(owners[active], landscape), row  # (A, ...) rows of the active

    return context


@torch.no_grad()
def halt(
    model: EnergyModel,
    state: torch.Tensor,
    schedule: list[int],
    options: StepOptions,
    context: Context,
    tolerance: float,
    grad_tolerance: float = 0.0,
    dim: int = 0,
) -> Halted:
    """The adaptive halting loop: candidates along `dim` of `state` (text (1, S, V) along 1;
    images (B, C, H, W) and video starts (B N, 1, F) along 0) step along `schedule`, each
    stopping on its own (see the module docstring). `state` is updated in place."""
    count, device = state.shape[dim], state.device
    active = torch.arange(count, device=device)  # candidates still thinking
    previous = torch.full((count,), float("inf"), dtype=state.dtype, device=device)
    last_energy = torch.zeros(count, dtype=state.dtype, device=device)
    steps = torch.zeros(count, dtype=torch.long, device=device)
    evaluations = torch.zeros(count, device=device)
    for landscape in schedule:
        if not len(active):
            break
        cache, rows = context(landscape, active)
        current = state.index_select(dim, active).detach().requires_grad_()  # (.., A, ..)
        with torch.enable_grad():
            new, energies = take_step(
                model, cache, current, options, False, rows, landscape=landscape
            )
        energies = energies.reshape(-1)  # (A,)
        evaluations[active] += 1
        go = ~((previous[active] - energies).abs() < tolerance)  # (A,) the step is kept
        kept = go.nonzero().squeeze(1)  # (A',) indices into the active candidates
        state.index_copy_(dim, active[kept], new.detach().index_select(dim, kept))
        last_energy[active], previous[active] = energies, energies
        steps[active[go]] += 1
        if grad_tolerance > 0:
            go = go & ~_flat(model, new, current, options, grad_tolerance, dim)
        active = active[go]
    return Halted(state, last_energy, steps, evaluations)


def _flat(model, new, current, options, grad_tolerance: float, dim: int) -> torch.Tensor:
    """(A,) whether each candidate's step moved it less than alpha * grad_tolerance."""
    moved = new.detach() - model.candidate_input(current).detach()  # the state's shape
    moved = moved.movedim(dim, 0).flatten(1).norm(dim=1)  # (A,)
    return (moved / options.step_size.clamp(min=1e-12)) < grad_tolerance


@torch.no_grad()
def adaptive_think(
    model: EnergyModel,
    tokens: torch.Tensor,
    max_steps: int,
    tolerance: float = 0.0,
    grad_tolerance: float = 0.0,
    init: torch.Tensor | None = None,
    langevin_noise: float | None = 0.0,
    step_size: float | None = None,
) -> AdaptiveResult:
    """Think at most `max_steps` per landscape, each token stopping on its own."""
    batch, length = tokens.shape
    shape = (batch, length, model.vocab_size)
    state = init.clone() if init is not None else torch.randn(shape, device=tokens.device)
    schedule = step_schedule(model.args.landscapes, max_steps)
    caches = encode_caches(model, tokens, schedule, with_graph=False)
    options = step_options(model, step_size, langevin_noise)
    rows = torch.arange(length, device=tokens.device)  # (S,)
    energies = torch.zeros(batch, length, dtype=state.dtype, device=tokens.device)
    steps = torch.zeros(batch, length, dtype=torch.long, device=tokens.device)
    evaluations = torch.zeros(batch, length, device=tokens.device)
    for row in range(batch):
        one = slice(row, row + 1)
        row_caches = {landscape: c.select(one, c.landscape) for landscape, c in caches.items()}
        context = shared_context(model, row_caches, rows)
        result = halt(model, state[one], schedule, options, context, tolerance, grad_tolerance, 1)
        energies[row], steps[row] = result.energies, result.steps  # state: updated in place
        evaluations[row] = result.evaluations
    return AdaptiveResult(state, energies, steps, float(evaluations.mean()))


@torch.no_grad()
def think_until_converged(
    model: EnergyModel,
    caches: dict,
    init: torch.Tensor,
    rows: torch.Tensor,
    max_steps: int,
    tolerance: float,
    step_size: float | None = None,
    langevin_noise: float | None = None,
) -> AdaptiveResult:
    """Adaptive halting for candidates init (1, R, V) of context rows `rows` (R,) against
    prebuilt context caches by landscape (generation: the newest position of a KV cache)."""
    schedule = step_schedule(model.args.landscapes, max_steps)
    options = step_options(model, step_size, langevin_noise)
    context = shared_context(model, caches, rows)
    result = halt(model, init.clone(), schedule, options, context, tolerance, dim=1)
    evaluations = float(result.evaluations.mean())
    return AdaptiveResult(result.state, result.energies[None], result.steps[None], evaluations)
