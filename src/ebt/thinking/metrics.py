"""Numbers reported about predictions: perplexity from a mean cross-entropy loss."""

from __future__ import annotations

import math

LOSS_CAP = 700.0  # exp() overflows a float64 past ~709.78


def perplexity(loss: float) -> float:
    """exp(loss), the loss capped at LOSS_CAP: a barely trained model reports a huge finite
    perplexity instead of raising OverflowError."""
    return math.exp(min(loss, LOSS_CAP))
