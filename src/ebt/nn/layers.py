"""Llama-style building blocks: RMSNorm, rotary position embeddings, SwiGLU, adaLN modulation."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Widen bf16/fp16 to float32 for numerically sensitive ops; never narrow float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, with a learned per-channel gain."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):  # one op (it supports double backward)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        normed = F.rms_norm(at_least_float32(x), self.weight.shape, eps=self.eps)
        return normed.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases; the paper's hidden width equals the model width."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_table(
    head_dim: int, length: int, theta: float = 1e4, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unit complex rotations (length, head_dim/2) for interleaved pairs (x0,x1), (x2,x3), ...

    In float32 this is computed exactly as the paper's code does (float32 angles, complex64).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=dtype)[: head_dim // 2] / head_dim
    angles = torch.outer(torch.arange(length, dtype=dtype), 1.0 / theta**exponents)
    return torch.polar(torch.ones_like(angles), angles)  # (length, head_dim/2)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (B, T, H, hd) by rotations (T, 1, hd/2).

    One complex multiply: fewer kernels than the real-valued form, and it supports double
    backward, which the prediction stream needs.
    """
    pairs = torch.view_as_complex(at_least_float32(x).unflatten(-1, (-1, 2)))  # (B, T, H, hd/2)
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


class RopeTables(nn.Module):
    """Rotation tables, built on first use per device: complex64 (float32 compute, as the paper)
    and complex128 (float64 compute, for exact reference checks).

    Not buffers: `model.to(torch.bfloat16)` casts complex buffers to real (dropping the
    imaginary part), and these tables must stay complex whatever the parameters' dtype.
    """

    def __init__(self, head_dim: int, length: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.length, self.theta = head_dim, length, theta
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        precision = torch.float64 if dtype == torch.float64 else torch.float32
        key = (positions.device, precision)
        if key not in self._tables:
            table = rope_table(self.head_dim, self.length, self.theta, precision)
            self._tables[key] = table.to(positions.device)  # (length, hd/2)
        return self._tables[key][positions]  # (T, hd/2)
