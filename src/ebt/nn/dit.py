"""DiT-style pieces shared by the image energy transformer and the DiT baseline.

Patch embedding on raw pixels, its inverse, the fixed 2-D sin-cos position table, a transformer
block with adaLN-Zero conditioning (LayerNorm without affine, attention with qkv bias, GELU-tanh
MLP, gates from the conditioning vector), the adaLN output head and the timestep embedder.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ebt.nn.layers import at_least_float32, modulate

NORM_EPS = 1e-6


def patch_grid(height: int, width: int, patch: int) -> tuple[int, int]:
    """(rows, columns) of patches in an image; refuses sizes that patches do not tile."""
    if height % patch or width % patch or height < patch or width < patch:
        raise ValueError(
            f"image size {height}x{width} is not a positive multiple of the patch size {patch}"
        )
    return height // patch, width // patch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Images (B, C, H, W) -> patches (B, N, p*p*C), row-major patches, (p, q, c) inside one."""
    rows, columns = patch_grid(images.shape[2], images.shape[3], patch)
    x = images.unflatten(2, (rows, patch)).unflatten(4, (columns, patch))  # (B, C, h, p, w, q)
    return x.permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)  # (B, h*w, p*q*C)


def unpatchify(patches: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """Patches (B, N, p*p*C) in patchify's layout -> images (B, C, H, W)."""
    rows, columns = patch_grid(height, width, patch)
    x = patches.unflatten(1, (rows, columns)).unflatten(3, (patch, patch, -1))  # (B,h,w,p,q,C)
    return x.permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)  # (B, C, H, W)


def _sincos(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin(pos * w_i), cos(pos * w_i)] with w_i = 10000^(-i / (dim/2)): (M,) -> (M, dim)."""
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).unsqueeze(1) * frequencies  # (M, dim/2)
    return torch.cat((angles.sin(), angles.cos()), dim=1)  # (M, dim)


def sincos_position_table(dim: int, rows: int, columns: int) -> torch.Tensor:
    """Fixed 2-D positions (rows*columns, dim) in float64, patches in row-major order.

    The first half of the channels encodes the column index, the second half the row index
    (the MAE / DiT table: its meshgrid puts the width coordinate first).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs a width divisible by 4, got {dim}")
    row_index, column_index = torch.meshgrid(
        torch.arange(rows), torch.arange(columns), indexing="ij"
    )  # (h, w) each
    by_column = _sincos(dim // 2, column_index.flatten())  # (N, dim/2)
    by_row = _sincos(dim // 2, row_index.flatten())  # (N, dim/2)
    return torch.cat((by_column, by_row), dim=1)  # (N, dim)


class PatchEmbedding(nn.Module):
    """Non-overlapping p x p pixel patches -> D-dim tokens (a Conv2d with kernel = stride = p),
    plus the fixed sin-cos position of each patch."""

    def __init__(self, channels: int, dim: int, patch: int, height: int, width: int) -> None:
        super().__init__()
        self.patch, self.dim = patch, dim
        self.projection = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch, bias=True)
        rows, columns = patch_grid(height, width, patch)
        table = sincos_position_table(dim, rows, columns).float()  # (N, D)
        self.register_buffer("positions", table, persistent=False)
        self._grid = (rows, columns)

    def position_table(self, rows: int, columns: int) -> torch.Tensor:
        """Positions (N, D) for a grid of patches; other grids than the built one are computed."""
        if (rows, columns) == self._grid:
            return self.positions
        table = sincos_position_table(self.dim, rows, columns)  # (N, D) float64
        return table.to(device=self.positions.device, dtype=self.positions.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows, columns = patch_grid(images.shape[2], images.shape[3], self.patch)
        tokens = self.projection(images).flatten(2).transpose(1, 2)  # (B, N, D)
        return tokens + self.position_table(rows, columns)  # (B, N, D)


def bidirectional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full attention (B, H, N, hd) -> (B, H, N, hd) with plain matmul/softmax, which autograd
    can differentiate twice (SDPA's fused CPU/CUDA kernels have no double backward)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, N, N)
    weights = at_least_float32(scores).softmax(dim=-1).type_as(q)  # (B, H, N, N)
    return weights @ v  # (B, H, N, hd)


class SelfAttention(nn.Module):
    """Multi-head self-attention over all tokens, one qkv projection with bias, output bias."""

    def __init__(self, dim: int, heads: int, double_backward: bool) -> None:
        super().__init__()
        self.heads = heads
        self.double_backward = double_backward
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.out = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd) each
        if self.double_backward:
            attended = bidirectional_attention(q, k, v)  # (B, H, N, hd)
        else:  # fused kernels: first-order gradients only
            attended = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.out(attended.transpose(1, 2).flatten(2))  # (B, N, D)


class GeluMLP(nn.Module):
    """fc2(gelu_tanh(fc1 x)), with biases."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


class DiTBlock(nn.Module):
    """adaLN-Zero block: shift/scale/gate for attention and MLP from the condition (B, D).

    h = x + g1 * Attn(mod(LN(x), s1, c1)); out = h + g2 * MLP(mod(LN(h), s2, c2)).
    double_backward: attention that supports a second differentiation (the energy model).
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, double_backward: bool) -> None:
        super().__init__()
        self.attention = SelfAttention(dim, heads, double_backward)
        self.feed_forward = GeluMLP(dim, mlp_dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        mod = self.modulation(condition).chunk(6, dim=-1)  # 6 x (B, D)
        attended = self.attention(modulate(_norm(x), mod[0], mod[1]))  # (B, N, D)
        h = x + mod[2].unsqueeze(1) * attended  # (B, N, D)
        mlp = self.feed_forward(modulate(_norm(h), mod[3], mod[4]))  # (B, N, D)
        return h + mod[5].unsqueeze(1) * mlp  # (B, N, D)


class AdaLNHead(nn.Module):
    """Final layer: LN, shift/scale from the condition, then Linear(D, out_features)."""

    def __init__(self, dim: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_features, bias=bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(condition).chunk(2, dim=-1)  # (B, D) each
        return self.linear(modulate(_norm(x), shift, scale))  # (B, N, out_features)


def timestep_frequencies(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0, dtype=torch.float32
) -> torch.Tensor:
    """Sinusoidal features [cos(t w_i), sin(t w_i)] (B, dim), w_i = max_period^(-i / (dim/2)),
    computed in `dtype` (float32 as the DiT computes them; float64 for exact checks)."""
    half = dim // 2
    exponents = torch.arange(half, dtype=dtype, device=timesteps.device) / half  # (dim/2,)
    frequencies = torch.exp(-math.log(max_period) * exponents)  # (dim/2,)
    angles = timesteps.to(dtype).unsqueeze(1) * frequencies  # (B, dim/2)
    features = torch.cat((angles.cos(), angles.sin()), dim=-1)  # (B, 2 * (dim/2))
    if dim % 2:
        features = F.pad(features, (0, 1))  # (B, dim)
    return features


class TimestepEmbedder(nn.Module):
    """Diffusion timestep (B,) -> condition (B, D): sinusoidal features, then an MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(self.mlp[0].weight.dtype, torch.float32)
        features = timestep_frequencies(timesteps, self.frequency_dim, dtype=dtype)  # (B, F)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (B, D)


def init_dit_weights(module: nn.Module) -> None:
    """The DiT initialisation: xavier-uniform Linears with zero biases, the patch projection
    initialised as the Linear it is, timestep MLP N(0, 0.02^2), and adaLN-Zero: every
    modulation layer and the head's output Linear zero."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    for layer in module.modules():  # after the generic pass, which would overwrite these
        if isinstance(layer, PatchEmbedding):
            weight = layer.projection.weight  # (D, C, p, p)
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
            nn.init.zeros_(layer.projection.bias)
        elif isinstance(layer, TimestepEmbedder):
            nn.init.normal_(layer.mlp[0].weight, std=0.02)
            nn.init.normal_(layer.mlp[2].weight, std=0.02)
        elif isinstance(layer, DiTBlock | AdaLNHead):
            nn.init.zeros_(layer.modulation[1].weight)
            nn.init.zeros_(layer.modulation[1].bias)
        if isinstance(layer, AdaLNHead):
            nn.init.zeros_(layer.linear.weight)
            if layer.linear.bias is not None:
                nn.init.zeros_(layer.linear.bias)
