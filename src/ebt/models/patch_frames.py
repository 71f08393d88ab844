"""Patch-token video models (`model.frame_tokens = "patches"`): every frame is a grid of
(frame_size / patch_size)^2 patch tokens instead of one token, so thinking can move every pixel.

Positions: the sequence is [step token (time_embed)] + frame 0's patches in raster order +
frame 1's + ...; RoPE runs over that sequence index and a learned table adds each patch's place
in the grid. Attention is block-causal: a frame's tokens see every token of earlier frames and of
their own frame (and the step token).

The EBT (`PatchFrameEnergyTransformer`): the context stream runs block-causally over the real
frames; candidate j (the frame after real frame j) is P patch tokens at the positions of frame
j + 1 that see the real tokens of frames 0..j and the candidate tokens of their own group, never
another group (a group is one candidate frame, e.g. one best-of-N start). A candidate frame's
energy is the sum of its patch tokens' energies (`patch_energies` keeps them apart). The
energies and dE/dx are written out (models/patch_gradient.py; training differentiates that
gradient once, no double backward): on the tiny preset, one thread, 459 - 465 ms per training
step against 643 - 662 with autograd, and 54 against 61 - 65 ms per rolled-out frame (32 clips;
docs/video.md). Its Transformer++ twin
(`PatchFrameTransformerPP`) reads the same tokens with the same attention and outputs every
patch of the next frame, optionally as a residual on the last frame (`model.frame_residual`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ebt.models import patch_gradient
from ebt.models.context_cache import ContextCache
from ebt.models.energy_transformer import EnergyTransformer, EnergyTransformerArgs
from ebt.models.transformer_pp import TransformerArgs, TransformerPP
from ebt.nn.block import Block, Rope
from ebt.nn.kv_cache import KeyValueBuffer
from ebt.nn.layers import RopeTables, apply_rope, at_least_float32, init_linear_xavier, modulate

CHANNELS = 3


def patchify(frames: torch.Tensor, side: int, patch: int) -> torch.Tensor:
    """Frame vectors (..., 3 side^2) -> patches (..., P, 3 patch^2), P = (side / patch)^2, raster
    order; each patch's numbers channel-major."""
    grid = side // patch
    x = frames.unflatten(-1, (CHANNELS, grid, patch, grid, patch))  # (..., C, g, p, g, p)
    lead = list(range(x.dim() - 5))
    x = x.permute(*lead, -4, -2, -5, -3, -1)  # (..., g, g, C, p, p)
    return x.flatten(-5, -4).flatten(-3)  # (..., P, C p p)


def unpatchify(patches: torch.Tensor, side: int, patch: int) -> torch.Tensor:
    """The inverse of patchify: patches (..., P, 3 patch^2) -> frame vectors (..., 3 side^2)."""
    grid = side // patch
    x = patches.unflatten(-1, (CHANNELS, patch, patch)).unflatten(-4, (grid, grid))
    lead = list(range(x.dim() - 5))
    x = x.permute(*lead, -3, -5, -2, -4, -1)  # (..., C, g, p, g, p)
    return x.flatten(-5)  # (..., C g p g p)


def frame_ids(positions: torch.Tensor, prefix: int, per_frame: int) -> torch.Tensor:
    """The frame of every sequence position (-1 for the prefix tokens, seen by everyone)."""
    return torch.where(
        positions < prefix, -1, (positions - prefix).div(per_frame, rounding_mode="floor")
    )


def block_causal(queries: torch.Tensor, keys: int, prefix: int, per_frame: int) -> torch.Tensor:
    """Boolean mask (Tq, Tk): a query at sequence position queries[i] may read key position k iff
    k's frame is not later than its own."""
    key_frames = frame_ids(torch.arange(keys, device=queries.device), prefix, per_frame)
    return frame_ids(queries, prefix, per_frame).unsqueeze(1) >= key_frames.unsqueeze(0)


def context_block(
    block: Block,
    x: torch.Tensor,
    rope: Rope,
    condition: torch.Tensor | None,
    allowed: torch.Tensor,
    keys_only: bool = False,
    past: KeyValueBuffer | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Block.context with a block-causal mask `allowed` (T, P + T) instead of a causal one:
    real tokens x (B, T, D) after `past`; returns (out, keys, values (B, H, P + T, hd))."""
    mod = block._modulation(condition)
    normed = block._attention_input(x, mod)
    k, v = block.attention.project(normed, "kv")  # (B, T, H, hd) each
    k, v = apply_rope(k, rope).transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
    if past is not None:
        k, v = past.append(k, v)  # (B, H, P + T, hd)
    if keys_only:
        return None, k, v
    (q,) = block.attention.project(normed, "q")
    q = apply_rope(q, rope).transpose(1, 2)  # (B, H, T, hd)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, H, T, hd)
    return block._finish(x, block.attention.merge(attended), mod), k, v


def prediction_block(
    block: Block,
    z: torch.Tensor,
    rope: Rope,
    condition: torch.Tensor | None,
    context: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
) -> torch.Tensor:
    """Candidate tokens z (B, N, D) read the context keys/values (B, H, Tc, hd) and the candidate
    tokens `mask` (N, Tc + N, additive) allows; plain matmul/softmax (double backward)."""
    mod = block._modulation(condition)
    q, k, v = block.attention.project(block._attention_input(z, mod), "qkv")  # (B, N, H, hd)
    q = apply_rope(q, rope).transpose(1, 2)  # (B, H, N, hd)
    k, v = apply_rope(k, rope).transpose(1, 2), v.transpose(1, 2)  # (B, H, N, hd)
    keys = torch.cat((context[0], k), dim=2)  # (B, H, Tc + N, hd)
    values = torch.cat((context[1], v), dim=2)
    scores = q @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask  # (B, H, N, Tc + N)
    weights = at_least_float32(scores).softmax(dim=-1).type_as(q)
    return block._finish(z, block.attention.merge(weights @ values), mod)  # (B, N, D)


class PatchTokens(nn.Module):
    """Frame vectors <-> patch tokens: the shared Linear(3 p^2, D) with bias and the learned
    patch-position table (P, D)."""

    def __init__(self, frame_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.side, self.patch = frame_size, patch_size
        self.count = (frame_size // patch_size) ** 2
        self.linear = nn.Linear(CHANNELS * patch_size**2, dim)
        self.position = nn.Parameter(torch.zeros(self.count, dim))
        init_linear_xavier(self)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, frames: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Frames (B, T, F) -> tokens (B, T * P, D), plus noise (B, T * P, D) if given."""
        tokens = self.linear(patchify(frames, self.side, self.patch)) + self.position  # (B,T,P,D)
        tokens = tokens.flatten(1, 2)  # (B, T P, D)
        return tokens if noise is None else tokens + noise

    def frames_of(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch rows (..., P, 3 p^2) -> frame vectors (..., 3 side^2) (unpatchify)."""
        return unpatchify(patches, self.side, self.patch)


class PatchFrameEnergyTransformer(EnergyTransformer):
    """The video EBT on patch tokens (see the module docstring); the interface of
    EnergyTransformer, with candidates still frame vectors (B, R, frame_dim)."""

    def __init__(self, args: EnergyTransformerArgs) -> None:
        super().__init__(args)
        self.patches = PatchTokens(args.frame_size, args.patch_size, args.dim)
        del self.frame_embedding  # the patches' Linear replaces the frame Linear
        self.prefix = 1 if args.variant == "time_embed" else 0
        length = (args.max_seq_len + 1) * self.patches.count + 2
        self.rope = RopeTables(args.dim // args.heads, length, args.rope_theta)

    @property
    def frame_embedding(self) -> nn.Linear:
        return self.patches.linear

    @property
    def tokens_per_frame(self) -> int:
        return self.patches.count

    def context_capacity(self, frames: int) -> int:
        return frames * self.patches.count + self.prefix

    def embed_context(self, inputs: torch.Tensor) -> torch.Tensor:
        """Frames (B, T, frame_dim) -> patch tokens (B, T P, D)."""
        return self.patches(inputs)

    def compile_training_passes(self) -> None:
        self.compiled_passes = {
            "context": torch.compile(type(self)._context_layers, dynamic=False),
            "gradient": torch.compile(patch_gradient.energies_and_gradient, dynamic=False),
        }

    def written_out_pass(self) -> Callable:
        """The written-out (energies, dE/dx) of patch frames (models/patch_gradient.py)."""
        return patch_gradient.energies_and_gradient

    def embed_candidates(
        self,
        frames: torch.Tensor,
        landscape: int,
        noise: torch.Tensor | None = None,
        zero_leaf_as_bias: bool = False,
    ) -> torch.Tensor:
        """Candidate frames (B, R, frame_dim) -> patch tokens (B, R P, D), plus the Langevin
        noise (B, R P, D) if given and the step embedding (pred_step). zero_leaf_as_bias (the
        one-token mode's shortcut for zero starts) is not taken here."""
        z = self.patches(frames, noise)  # (B, R P, D)
        if self.variant == "pred_step":
            z = z + self.step_embedding.weight[landscape]
        return z

    def _embedding_noise(
        self, frames: torch.Tensor, langevin_std: float | torch.Tensor | None
    ) -> torch.Tensor | None:
        """Langevin noise (B, R P, D) for the patch tokens of frames (B, R, frame_dim)."""
        if langevin_std is None:
            return None
        shape = (frames.shape[0], frames.shape[1] * self.patches.count, self.args.dim)
        return torch.randn(shape, dtype=frames.dtype, device=frames.device) * langevin_std

    def _context_layers(self, x, rope, condition):
        """Per-layer keys and values of the block-causal context stream over x (B, T, D)."""
        positions = torch.arange(x.shape[1], device=x.device)
        allowed = block_causal(positions, x.shape[1], self.prefix, self.patches.count)
        keys, values = [], []
        for index, block in enumerate(self.blocks):
            last = index == len(self.blocks) - 1
            x, k, v = context_block(block, x, rope, condition, allowed, keys_only=last)
            keys.append(k)
            values.append(v)
        return keys, values

    @torch.no_grad()
    def extend_context(self, cache: ContextCache, tokens: torch.Tensor) -> ContextCache:
        """Append frames (B, T, frame_dim) to a context cache (the rollout's KV cache)."""
        start, buffers = cache.length, cache.buffers
        if buffers is None or buffers[0].length != start:
            buffers = [KeyValueBuffer(k, v) for k, v in zip(cache.keys, cache.values, strict=True)]
        x = self.embed_context(tokens)  # (B, T P, D)
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        rope = self._rope(positions).unsqueeze(1)  # (T P, 1, hd/2)
        allowed = block_causal(positions, start + x.shape[1], self.prefix, self.patches.count)
        keys, values = [], []
        for index, (block, buffer) in enumerate(zip(self.blocks, buffers, strict=True)):
            last = index == len(self.blocks) - 1
            x, k, v = context_block(block, x, rope, cache.condition, allowed, last, buffer)
            keys.append(k)
            values.append(v)
        return ContextCache(keys, values, cache.landscape, cache.condition, buffers)

    def energies(self, cache, probabilities, rows=None, landscape=None, langevin_std=None):
        """Energy (B, R) of candidate frames (B, R, frame_dim): the sum of patch_energies."""
        return self.patch_energies(cache, probabilities, rows, landscape, langevin_std).sum(-1)

    def patch_energies(
        self,
        cache: ContextCache,
        frames: torch.Tensor,
        rows: torch.Tensor | None = None,
        landscape: int | None = None,
        langevin_std: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Energy of every patch (B, R, P) of candidate frames (B, R, frame_dim); rows[r] is the
        real frame candidate r follows (default 0..R-1); arguments as EnergyTransformer.energies."""
        batch, count, per = frames.shape[0], frames.shape[1], self.patches.count
        if rows is None:
            rows = torch.arange(count, device=frames.device)
        landscape = cache.landscape if landscape is None else landscape
        noise = self._embedding_noise(frames, langevin_std)  # (B, R P, D) or None
        z = self.embed_candidates(frames, landscape, noise)  # (B, R P, D)
        rope = self._rope(self._candidate_positions(rows)).unsqueeze(1)  # (R P, 1, hd/2)
        mask = self._prediction_mask(rows, cache.length, z.dtype)  # (R P, Tc + R P)
        for block, k, v in zip(self.blocks, cache.keys, cache.values, strict=True):
            z = prediction_block(block, z, rope, cache.condition, (k, v), mask)
        z = self.norm(z)
        if self.final_modulation is not None:
            shift, scale = self.final_modulation(cache.condition).chunk(2, dim=-1)  # (B, D) each
            z = modulate(z, shift, scale)
        return self.energy_head(z).view(batch, count, per)  # (B, R, P)

    def _candidate_positions(self, rows: torch.Tensor) -> torch.Tensor:
        """Candidate r's patches sit at the positions of real frame rows[r] + 1: (R P,)."""
        per = self.patches.count
        first = self.prefix + (rows + 1) * per  # (R,)
        return (first.unsqueeze(1) + torch.arange(per, device=rows.device)).flatten()

    def _prediction_mask(self, rows: torch.Tensor, length: int, dtype) -> torch.Tensor:
        """Additive (R P, Tc + R P): context keys of frames <= rows[r] and the step token; the
        candidate tokens of the same group r."""
        group = torch.arange(rows.shape[0], device=rows.device)
        group = group.repeat_interleave(self.patches.count)  # (R P,)
        own = group.unsqueeze(1) == group.unsqueeze(0)  # (R P, R P)
        own = torch.zeros(own.shape, dtype=dtype, device=rows.device).masked_fill(~own, -torch.inf)
        return torch.cat((self._context_mask(rows, length, dtype), own), dim=1)

    def _context_mask(self, rows: torch.Tensor, length: int, dtype) -> torch.Tensor:
        """Additive (R P, Tc): the context keys of frames <= rows[r] and the step token."""
        per = self.patches.count
        key_frames = frame_ids(torch.arange(length, device=rows.device), self.prefix, per)
        allowed = key_frames.unsqueeze(0) <= rows.repeat_interleave(per).unsqueeze(1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=rows.device)
        return mask.masked_fill(~allowed, float("-inf"))  # (R P, Tc)


class PatchFrameTransformerPP(TransformerPP):
    """The Transformer++ twin on patch tokens: block-causal, every patch of the next frame out
    (Linear(D, D), then Linear(D, 3 p^2)); frame_residual: the next frame is the last frame plus
    that output."""

    def __init__(self, args: TransformerArgs) -> None:
        super().__init__(args)
        self.patches = PatchTokens(args.frame_size, args.patch_size, args.dim)
        del self.frame_embedding
        self.frame_output = nn.Linear(args.dim, CHANNELS * args.patch_size**2)
        init_linear_xavier(self.frame_output)
        length = (args.max_seq_len + 1) * self.patches.count + 2
        self.rope = RopeTables(args.dim // args.heads, length, args.rope_theta)

    def context_capacity(self, frames: int) -> int:
        return frames * self.patches.count

    def forward_cached(self, tokens, past=None, capacity=0):
        """Next frames (B, T, F) for frames (B, T, F) after `past` (per-layer key/value buffers,
        appended to in place), and the cache; without past a new one for `capacity` positions."""
        x = self.patches(tokens)  # (B, T P, D)
        start = past[0].length if past else 0
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        rope = self.rope(positions, x.dtype).unsqueeze(1)  # (T P, 1, hd/2)
        allowed = block_causal(positions, start + x.shape[1], 0, self.patches.count)
        cache = []
        for index, block in enumerate(self.blocks):
            buffer = past[index] if past else None
            x, k, v = context_block(block, x, rope, None, allowed, past=buffer)
            if buffer is None and capacity:
                buffer = KeyValueBuffer(k, v, capacity)
            if buffer is not None:
                cache.append(buffer)
        out = self.frame_output(self.output(self.norm(x)))  # (B, T P, 3 p^2)
        side, patch = self.args.frame_size, self.args.patch_size
        frames = unpatchify(out.unflatten(1, (tokens.shape[1], -1)), side, patch)  # (B, T, F)
        return (frames + tokens if self.args.frame_residual else frames), cache
