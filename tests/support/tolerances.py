"""The relative error the parity and gradient tests compare with."""

from __future__ import annotations

import torch


def relative(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-12) -> float:
    """max |actual - expected| / max |expected| (at least `floor`), in float64, detached."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=floor)).item()


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Named parameters that receive gradients."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def gradients(loss: torch.Tensor, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """d loss / d parameter for every trainable parameter (zeros where unused)."""
    params = trainable(model)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(params.items(), grads, strict=True)
    }
