"""Evaluation of any modality: the task-weighted loss per thinking step, energies and the
task's own metrics (text: perplexity; images: PSNR) over a split."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from tqdm import tqdm

from ebt.training.distributed import all_reduce_sum
from ebt.training.objective import Objective

PER_STEP = ("loss_per_step", "energy_per_step")
MEANS = ("forward_passes",)  # model evaluations per prediction (token or image)


def evaluate(
    objective: Objective,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the objective in eval mode (no randomised recipe knobs, no second-order graph).

    Thinking starts from random candidates (and images from fresh noise), so the generator is
    seeded (and the caller's RNG state restored afterwards): the same checkpoint always
    evaluates to the same numbers. Every metric is a mean weighted by the task (text: target
    tokens; images: images). Returns loss (the final step's), loss_per_step, energy_per_step,
    energy_gap, forward_passes (model evaluations per prediction: EBT steps, 1 for
    Transformer++, DDIM's timestep + 1 for the DiT) and the task's summary (text: ppl; images:
    psnr, mse, noise_level). `progress`: an `eval` bar on stderr (after 2 s) counting the
    batches done, so a long evaluation (a DiT's DDIM) shows that it is working.
    """
    was_training = objective.training
    objective.eval()
    sums: dict[str, torch.Tensor] = {}
    weight = torch.zeros((), dtype=torch.float64, device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        shown = tqdm(batches, "eval", unit="batch", file=sys.stderr, delay=2, disable=not progress)
        for batch in shown:
            batch = batch.to(device)
            count = objective.task.weight(batch)
            metrics = objective(batch).metrics
            metrics.setdefault("loss_per_step", metrics["loss"].reshape(1))
            for key, value in metrics.items():
                if key in PER_STEP + MEANS or key in objective.task.quality_keys:
                    _accumulate(sums, key, value.double() * count)
            weight += count
    objective.train(was_training)
    result = _summarise(sums, all_reduce_sum(weight), objective.task.weight_name)
    return objective.task.summarise(result)


def _accumulate(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value.clone()


def _summarise(sums: dict[str, torch.Tensor], weight: torch.Tensor, name: str) -> dict[str, Any]:
    if weight.item() == 0:
        raise ValueError("evaluation saw no targets: the split is empty or all padding")
    result: dict[str, Any] = {name: int(weight.item())}
    for key, value in sums.items():
        result[key] = (all_reduce_sum(value) / weight).tolist()
    result["loss"] = result["loss_per_step"][-1]
    if "energy_per_step" in result:
        energies = result["energy_per_step"]
        result["energy_gap"] = energies[0] - energies[-1]
    return result
