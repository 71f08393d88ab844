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


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its weights moved off their initialisation and rounded to values bf16
    represents: autocast's weight casts are then exact, and what remains to compare is the
    rounding of the activations (with weights rounded too, some of these tiny random models
    move dE/dp by 10% on the weights' rounding alone)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name not in ("step_size", "langevin_std"):
                parameter.add_(0.05 * torch.randn_like(parameter))
                parameter.copy_(parameter.bfloat16())
    return model


def normwise(ours: dict, theirs: dict) -> float:
    """||ours - theirs|| / ||theirs|| over all parameter gradients together, in float64."""
    ours = torch.cat([ours[name].detach().double().flatten() for name in theirs])
    theirs = torch.cat([gradient.detach().double().flatten() for gradient in theirs.values()])
    return ((ours - theirs).norm() / theirs.norm()).item()
