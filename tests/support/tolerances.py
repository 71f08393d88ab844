"""The relative error the parity and gradient tests compare with."""

from __future__ import annotations

import torch


def relative(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-12) -> float:
    """max |actual - expected| / max |expected| (at least `floor`), in float64, detached."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=floor)).item()
