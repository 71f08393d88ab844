"""Explicit precision for the written-out passes under mixed-precision autocast.

Under `torch.autocast` (CUDA or CPU, bf16 or fp16) matrix products run in the autocast dtype;
which other ops autocast widens differs between devices and versions (softmax, sums and
layer norms are widened on CUDA, not on CPU). The written-out energies and gradients therefore
say what they need: `wide` for softmax, norm statistics, rotations and reductions, and
`full_precision` for the few products that must stay float32 (the energy head). Outside
autocast, and in float32/float64, both are no-ops: the computation is bit for bit unchanged.
"""

from __future__ import annotations

import contextlib

import torch

from ebt.nn.layers import at_least_float32

wide = at_least_float32  # bf16/fp16 -> float32; float32/float64 returned as they are


def full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast turned off for x's device inside (operands keep their own dtype); nothing when
    autocast is off already."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)


def no_autograd() -> contextlib.AbstractContextManager:
    """Nothing recorded for autograd: inference_mode eagerly; no_grad inside a graph that
    torch.compile traces (an inference_mode boundary does not trace into one graph, and the
    arithmetic is the same)."""
    return torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()
