"""The DiT denoiser baseline: a diffusion transformer on raw pixels with learned variance.

The same trunk as the image energy transformer (patch embedding, fixed sin-cos positions,
adaLN-Zero blocks), conditioned on the diffusion timestep instead of a learned vector, with an
output head that predicts, per pixel, the noise epsilon and the variance interpolation value
(2 x channels out with learned sigma). The schedule, losses and DDIM sampling are in
ebt.modalities.image.diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ebt.nn.dit import (
    AdaLNHead,
    DiTBlock,
    PatchEmbedding,
    TimestepEmbedder,
    init_dit_weights,
    unpatchify,
)


@dataclass
class ImageShape:
    """The trunk both image models share (the DiT and the image EBT are built alike)."""

    image_size: int = 32  # height = width the position table is built for
    channels: int = 3
    patch_size: int = 4
    dim: int = 256
    layers: int = 4
    heads: int = 4
    ffn_dim: int | None = None  # None: the model width (the paper's mlp_ratio 1)


@dataclass
class DiTArgs(ImageShape):
    learn_sigma: bool = True  # predict the variance too: 2 x channels out
    frequency_dim: int = 256  # sinusoidal timestep features fed to the timestep MLP


class DiT(nn.Module):
    """Predicts (epsilon, variance value) per pixel from a noised image and its timestep."""

    def __init__(self, args: DiTArgs) -> None:
        super().__init__()
        self.args = args
        self.out_channels = args.channels * (2 if args.learn_sigma else 1)
        size = args.image_size
        self.patch_embedding = PatchEmbedding(args.channels, args.dim, args.patch_size, size, size)
        self.timestep_embedder = TimestepEmbedder(args.dim, args.frequency_dim)
        ffn_dim = args.ffn_dim or args.dim
        self.blocks = nn.ModuleList(
            DiTBlock(args.dim, args.heads, ffn_dim, double_backward=False)
            for _ in range(args.layers)
        )
        patch_outputs = args.patch_size**2 * self.out_channels
        self.output_head = AdaLNHead(args.dim, patch_outputs, bias=True)
        init_dit_weights(self)

    @property
    def patch_size(self) -> int:
        return self.args.patch_size

    def forward(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noised images (B, C, H, W) at integer timesteps (B,) -> (B, out_channels, H, W):
        channels [0, C) the predicted noise, [C, 2C) the variance values in [-1, 1] (learned
        sigma; unbounded, as the model emits them)."""
        x = self.patch_embedding(images)  # (B, N, D)
        condition = self.timestep_embedder(timesteps)  # (B, D)
        for block in self.blocks:
            x = block(x, condition)  # (B, N, D)
        patches = self.output_head(x, condition)  # (B, N, p*p*out_channels)
        height, width = images.shape[2], images.shape[3]
        return unpatchify(patches, self.patch_size, height, width)  # (B, out_channels, H, W)
