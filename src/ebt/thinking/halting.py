"""Adaptive thinking: every token stops when its energy stops moving, and leaves the batch.

Positions are independent (a candidate reads only the context and itself), so the unconverged
candidates are gathered into a smaller batch for the next step: real compute saved, not a mask.
A token halts at step k when |E_k - E_{k-1}| < tolerance (E_k: energy of the state step k starts
from) or when the gradient norm of its step falls under `grad_tolerance`; its answer is then the
state it had reached. `max_steps` per landscape is the budget. Images halt the same way, one
image per candidate (`halt_per_candidate`, used by ebt.modalities.image.denoise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebt.models import EnergyTransformer
from ebt.thinking.loop import StepOptions, encode_caches, step_schedule, take_step


@dataclass
class AdaptiveResult:
    logits: torch.Tensor  # (B, S, V) final raw candidates
    energies: torch.Tensor  # (B, S) last energy each token saw
    steps: torch.Tensor  # (B, S) steps each token took
    forward_passes_per_token: float  # mean energy evaluations per token


def _think_row(
    model, caches, state, schedule, options, tolerance, grad_tolerance, rows=None, dim=1
):
    """Candidates along `dim` of `state` that halt one by one: text (1, S, V) along dim 1 for
    context rows `rows` (default 0..S-1), images (B, C, H, W) along dim 0; returns (state, last
    energies (S,), steps (S,), energy evaluations (S,)), the state updated in place."""
    length = state.shape[dim]
    rows = torch.arange(length, device=state.device) if rows is None else rows  # (S,)
    active = torch.arange(length, device=state.device)  # positions still thinking
    previous = torch.full((length,), float("inf"), dtype=state.dtype, device=state.device)
    last_energy = torch.zeros(length, dtype=state.dtype, device=state.device)
    steps = torch.zeros(length, dtype=torch.long, device=state.device)
    evaluations = torch.zeros(length, device=state.device)
    for landscape in schedule:
        if not len(active):
            break
        cache = caches[landscape if model.context_depends_on_landscape else 0]
        current = state.index_select(dim, active).detach().requires_grad_()  # (1, R, V) / (R, ...)
        with torch.enable_grad():
            new, energies = take_step(
                model, cache, current, options, False, rows[active], landscape=landscape
            )
        energies = energies.reshape(-1)  # (R,)
        evaluations[active] += 1
        stalled = (previous[active] - energies).abs() < tolerance
        moved = new.detach() - model.candidate_input(current).detach()  # the state's shape
        moved = moved.movedim(dim, 0).flatten(1).norm(dim=1)  # (R,)
        flat = (moved / options.step_size.clamp(min=1e-12)) < grad_tolerance
        go = ~stalled
        kept = go.nonzero().squeeze(1)  # (R',) indices into the active candidates
        state.index_copy_(dim, active[kept], new.detach().index_select(dim, kept))
        last_energy[active], previous[active] = energies, energies
        steps[active[go]] += 1
        active = active[go & ~flat]
    return state, last_energy, steps, evaluations


def halt_per_candidate(
    model, cache, state: torch.Tensor, max_steps: int, tolerance: float, options, dim: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adaptive halting for a model whose context does not depend on the landscape (images: state
    (B, C, H, W), dim 0): each candidate along `dim` stops on its own within `max_steps`.
    Returns (final state, last energies (B,), steps (B,), energy evaluations (B,))."""
    schedule = step_schedule(1, max_steps)
    with torch.no_grad():
        return _think_row(
            model, {0: cache}, state.clone(), schedule, options, tolerance, 0.0, dim=dim
        )


@torch.no_grad()
def adaptive_think(
    model: EnergyTransformer,
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
    options = _options(model, step_size, langevin_noise)
    energies = torch.zeros(batch, length, dtype=state.dtype, device=tokens.device)
    steps = torch.zeros(batch, length, dtype=torch.long, device=tokens.device)
    evaluations = torch.zeros(batch, length, device=tokens.device)
    for row in range(batch):
        rows = slice(row, row + 1)
        row_caches = {landscape: c.select(rows, c.landscape) for landscape, c in caches.items()}
        result = _think_row(
            model, row_caches, state[row : row + 1], schedule, options, tolerance, grad_tolerance
        )
        state[row : row + 1], energies[row], steps[row], evaluations[row] = result
    return AdaptiveResult(state, energies, steps, float(evaluations.mean()))


def _options(model: EnergyTransformer, step_size, langevin_noise) -> StepOptions:
    noise = model.langevin_std.detach() if langevin_noise is None else langevin_noise
    return StepOptions(step_size=model.resolve_step_size(step_size), langevin_std=noise)


@torch.no_grad()
def think_until_converged(
    model: EnergyTransformer,
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
    options = _options(model, step_size, langevin_noise)
    state, energies, steps, evaluations = _think_row(
        model, caches, init.clone(), schedule, options, tolerance, 0.0, rows
    )
    return AdaptiveResult(state, energies[None], steps[None], float(evaluations.mean()))
