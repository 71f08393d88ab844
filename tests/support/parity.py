"""Parity with the paper's float32 outputs (tests/vectors), one thinking step at a time.

Free-running, the reference's own float32 rounding in step k is amplified by step k + 1 (the
second time_embed step about 30-fold in float64, more in float32 on some CPUs), so a whole
trajectory can be held to a few 1e-5 only. Started from the reference's own state before each
step, a comparison sees one step's float32 rounding: observed <= 1.7e-6 relative to the largest
entry in float64 and float32 (2^-24 = 6e-8 per operation, accumulated over the dot products of
width <= 257), so STEP_TOLERANCE = 1e-5 leaves a 6x margin and still fails on a 1e-4 relative
change of the step size or a weight, or on an RMSNorm epsilon of 1e-6 instead of 1e-5.
"""

from __future__ import annotations

import torch

from ebt.thinking.loop import StepOptions, step_schedule, think
from support.tolerances import relative

STEP_TOLERANCE = 1e-5


def stepwise_errors(model, expected: dict, dtype: torch.dtype) -> list[tuple[float, float]]:
    """(state error, energy error) of every step of the inference schedule, each step started
    from the reference's state before it (the first from its init), relative to the largest
    entry of the reference."""
    tokens = expected["tokens_with_target"][:, :-1]  # (B, S)
    schedule = step_schedule(model.args.landscapes, model.args.inference_steps)
    options = StepOptions(step_size=model.step_size.detach(), langevin_std=0.0)
    starts = [expected["init"], *expected["states"][:-1]]  # (B, S, V) each
    steps = zip(starts, schedule, expected["states"], expected["energies"], strict=True)
    errors = []
    for start, landscape, state, energies in steps:
        ours = think(model, tokens, start.to(dtype), [landscape], options)
        state_error = relative(ours.states[0], state.to(dtype))
        errors.append((state_error, relative(ours.energies[0], energies.to(dtype))))
    return errors
