"""Llama-style building blocks: RMSNorm, rotary position embeddings, SwiGLU, adaLN modulation."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, with a learned per-channel gain."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op (it supports double backward)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases; the paper keeps the hidden width equal to the model width."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_table(head_dim: int, length: int, theta: float = 1e4) -> torch.Tensor:
    """Unit complex rotations (length, head_dim/2) for interleaved pairs (x0,x1), (x2,x3), ..."""
    inverse = 1.0 / theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
    angles = torch.outer(torch.arange(length).float(), inverse)  # (length, head_dim/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (B, T, H, hd) by rotations (T, 1, hd/2).

    One complex multiply: fewer kernels than the real-valued form, and it supports double
    backward, which the prediction stream needs.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, hd/2)
    return torch.view_as_real(pairs * rotations).flatten(-2).type_as(x)  # (B, T, H, hd)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT adaLN: x * (1 + scale) + shift, with shift/scale (B, D) broadcast over positions."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def init_linear_xavier(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for every Linear, as the paper's code initialises."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
