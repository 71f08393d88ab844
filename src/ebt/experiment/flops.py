"""Counted compute of a run: FLOPs of its training steps and its parameter counts.

FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` records every
matmul, convolution and attention kernel (forward, input gradient and second-order backward
alike) of real training steps, as `ebt train` takes them (`ebt.training.step.TrainingStep`,
through the stepper of `ebt bench train`, on a batch of the run's shape, on CPU: the run's
train.precision resolved for CPU, so float32 under the default "auto"; counts depend on shapes,
not on the dtype). Elementwise work is not counted, as in
the usual convention. Recipes with random step counts take a different number of passes per
step, so the count is the mean over a few steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ebt.config import Config
from ebt.training.bench import _Stepper  # the same step `ebt bench train` times

COUNTED_STEPS = 3


def training_flops_per_step(config: Config, vocab_size: int, steps: int = COUNTED_STEPS) -> float:
    """Mean FLOPs of one training step (forward, backward, optimiser) of `config` on CPU.

    Counted eager in float32 whatever the run's train.compile / cuda_graphs / precision: the
    counter does not see inside compiled graphs, and the count depends on shapes only (CPU
    bf16 autocast would only make the count slower)."""
    config = copy.deepcopy(config)
    config.train.compile, config.train.cuda_graphs, config.train.precision = False, False, "fp32"
    stepper = _Stepper(config, vocab_size, torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with counter:
        for _ in range(steps):
            stepper.step()
    return counter.get_total_flops() / steps


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """All parameters, and those outside embedding tables (the paper's x axis)."""
    total = sum(parameter.numel() for parameter in model.parameters())
    tables = sum(
        parameter.numel()
        for module in model.modules()
        if isinstance(module, nn.Embedding)
        for parameter in module.parameters(recurse=False)
    )
    return {"parameters": total, "non_embedding_parameters": total - tables}
