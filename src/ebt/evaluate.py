"""Evaluation: token-weighted loss, perplexity and per-step energies over a split."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ebt.distributed import all_reduce_sum
from ebt.objective import Objective


@torch.no_grad()
def _count_targets(batch: torch.Tensor, pad_id: int) -> torch.Tensor:
    return (batch[:, 1:] != pad_id).sum().double()


def evaluate(
    objective: Objective,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the objective in eval mode (no randomised recipe knobs, no second-order graph).

    Thinking starts from random candidates, so the generator is seeded (and the caller's RNG
    state restored afterwards): the same checkpoint always evaluates to the same numbers.
    Returns loss (final-step cross-entropy), ppl, loss_per_step, energy_per_step, energy_gap.
    """
    was_training = objective.training
    objective.eval()
    sums: dict[str, torch.Tensor] = {}
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for batch in batches:
            batch = batch.to(device)
            count = _count_targets(batch, objective.pad_id)
            metrics = objective(batch).metrics
            per_step = metrics.get("loss_per_step", metrics["loss"].reshape(1))
            _accumulate(sums, "loss_per_step", per_step.double() * count)
            if "energy_per_step" in metrics:
                _accumulate(sums, "energy_per_step", metrics["energy_per_step"].double() * count)
            tokens += count
    objective.train(was_training)
    return _summarise(sums, all_reduce_sum(tokens))


def _accumulate(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value.clone()


def _summarise(sums: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, Any]:
    if tokens.item() == 0:
        raise ValueError("evaluation saw no target tokens: the split is empty or all padding")
    result: dict[str, Any] = {"tokens": int(tokens.item())}
    for key, value in sums.items():
        result[key] = (all_reduce_sum(value) / tokens).tolist()
    loss = result["loss_per_step"][-1]
    result.update(loss=loss, ppl=math.exp(min(loss, 700.0)))
    if "energy_per_step" in result:
        energies = result["energy_per_step"]
        result["energy_gap"] = energies[0] - energies[-1]
    return result
