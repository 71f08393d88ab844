"""Row-tensor pieces of the written-out candidate gradient (candidate_gradient.py,
patch_gradient.py): Linear and RMSNorm forwards and their vector-Jacobian products, adaLN
modulation, head batching and RoPE, with the float32 policy of `ebt.nn.precision`."""

from __future__ import annotations

import torch
from torch import nn

from ebt.nn.precision import wide

Saved = tuple[torch.Tensor, ...]

# Row tensors are (N, D) with N = B * R (batch rows times candidates): 2-D matmuls dispatch to
# one kernel each, where a 3-D nn.Linear call goes through several.


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return torch.mm(x, layer.weight.t())  # (N, out)


def linear_backward(grad: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return torch.mm(grad, layer.weight)  # (N, in)


def rms_forward(x: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, Saved]:
    """RMSNorm of rows x (N, D) in float32 at least; saves (normalised x, 1/rms (N, 1))."""
    x = wide(x)  # (N, D)
    inverse = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(norm.eps))  # (N, 1)
    normalised = x * inverse  # (N, D)
    return normalised * norm.weight, (normalised, inverse)


def rms_backward(grad: torch.Tensor, norm: nn.Module, saved: Saved) -> torch.Tensor:
    normalised, inverse = saved
    grad = wide(grad) * norm.weight  # (N, D)
    return inverse * (grad - normalised * (grad * normalised).mean(-1, keepdim=True))


def modulated(x: torch.Tensor, mod: tuple | None, index: int) -> torch.Tensor:
    return x if mod is None else torch.addcmul(mod[index], x, 1 + mod[index + 1])


def unmodulated(grad: torch.Tensor, mod: tuple | None, index: int) -> torch.Tensor:
    return grad if mod is None else grad * (1 + mod[index + 1])


def gated(x: torch.Tensor, mod: tuple | None, index: int) -> torch.Tensor:
    return x if mod is None else mod[index] * x


def batched(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, R, H, hd) -> (B * H, R, hd) for batched matmuls (a view when R == 1)."""
    batch, rows, heads, _ = shape
    return x.transpose(1, 2).reshape(batch * heads, rows, -1)


def unbatched(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(B * H, R, hd) -> (B, R, H, hd)."""
    batch, rows, heads, _ = shape
    return x.view(batch, heads, rows, -1).transpose(1, 2)


def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """apply_rope of x (B, R, H, hd), in float32 at least, without dtype round trips."""
    pairs = torch.view_as_complex(wide(x).unflatten(-1, (-1, 2)))  # (B, R, H, hd/2)
    return torch.view_as_real(pairs * rope).flatten(-2)  # (B, R, H, hd)
