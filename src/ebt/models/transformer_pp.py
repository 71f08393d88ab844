"""Transformer++: the llama-style decoder baseline with the same blocks and sizes as the EBT.

Text: token embedding, blocks, final RMSNorm, output head over the vocabulary. Video
(frame_dim > 0, the paper's video baseline): Linear(frame_dim, D) down, the same trunk,
Linear(D, D) (no bias), Linear(D, frame_dim) up: the next frame vector at every position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ebt.nn.block import Block
from ebt.nn.kv_cache import KeyValueBuffer, StaticKeyValueBuffer
from ebt.nn.layers import RMSNorm, RopeTables, init_linear_xavier


@dataclass
class TransformerArgs:
    vocab_size: int
    dim: int
    layers: int
    heads: int
    ffn_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e4
    frame_dim: int = 0  # 0: text (token ids -> logits); > 0: frame vectors -> next frames
    frame_size: int = 0  # video patch tokens (models.patch_frames): pixels per frame side
    patch_size: int = 0  # 0: one token per frame; > 0: patch tokens of this side
    frame_residual: bool = False  # patch tokens: the next frame is the last one plus the output


class TransformerPP(nn.Module):
    """Causal decoder: token embedding, pre-norm blocks, final RMSNorm, untied output head."""

    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.args = args
        if args.frame_dim:
            self.frame_embedding = nn.Linear(args.frame_dim, args.dim)
        else:
            self.token_embedding = nn.Embedding(args.vocab_size, args.dim)
        self.blocks = nn.ModuleList(
            Block(args.dim, args.heads, args.ffn_dim, args.norm_eps, adaln=False)
            for _ in range(args.layers)
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        width = args.dim if args.frame_dim else args.vocab_size  # video: Linear(D, D), then up
        self.output = nn.Linear(args.dim, width, bias=False)
        if args.frame_dim:
            self.frame_output = nn.Linear(args.dim, args.frame_dim)
        init_linear_xavier(self)
        self.rope = RopeTables(args.dim // args.heads, args.max_seq_len + 2, args.rope_theta)
        self.compiled_forward: Callable | None = None  # see compile_training_passes

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    def context_capacity(self, frames: int) -> int:
        """Cache positions that `frames` real tokens (frames) take."""
        return frames

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, S, V) for tokens (B, S); next frames (B, S, F) for frames
        (B, S, F)."""
        if self.compiled_forward is not None and torch.is_grad_enabled():
            return self.compiled_forward(self, tokens)
        return self._logits(tokens)

    def compile_training_passes(self) -> None:
        """torch.compile the forward of training steps (train.compile); as the EBT's, only
        while grad is enabled: evaluation and generation stay eager."""
        self.compiled_forward = torch.compile(TransformerPP._logits, dynamic=False)  # (model, ids)

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_cached(tokens)[0]  # (B, S, V)

    def forward_cached(
        self, tokens: torch.Tensor, past: list[KeyValueBuffer] | None = None, capacity: int = 0
    ) -> tuple[torch.Tensor, list[KeyValueBuffer]]:
        """Logits (B, T, V) for tokens (B, T) (next frames (B, T, F) for frames (B, T, F)) that
        follow `past` (per-layer key/value buffers, the generation KV cache, appended to in
        place), and the cache. Without past, a new cache with room for `capacity` positions
        (none when capacity is 0)."""
        frames = self.args.frame_dim > 0
        x = self.frame_embedding(tokens) if frames else self.token_embedding(tokens)  # (B, T, D)
        start = past[0].length if past else 0
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        rope = self.rope(positions, x.dtype).unsqueeze(1)  # (T, 1, hd/2): broadcast over heads
        cache = []
        for index, block in enumerate(self.blocks):
            x, k, v = block.context(x, rope, None, past=past[index] if past else None)
            if past or capacity:
                cache.append(past[index] if past else KeyValueBuffer(k, v, capacity))
        out = self.output(self.norm(x))  # (B, T, V) logits, or (B, T, D) for frames
        return (self.frame_output(out) if frames else out), cache  # (B, T, V or F)

    def forward_static(
        self, tokens: torch.Tensor, buffers: list[StaticKeyValueBuffer], position: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, 1, V) of one token per row (B, 1) written into fixed-capacity buffers at
        position (1,), attending to the keys up to it: the same shapes at every position (graph
        decoding); equals forward_cached's up to rounding. Text only."""
        x = self.token_embedding(tokens)  # (B, 1, D)
        rope = self.rope(position, x.dtype).unsqueeze(1)  # (1, 1, hd/2)
        capacity = buffers[0].keys.shape[2]
        allowed = torch.arange(capacity, device=tokens.device) <= position  # (C,)
        at = (position, allowed.unsqueeze(0))  # (1,), (1, C)
        for block, buffer in zip(self.blocks, buffers, strict=True):
            x, _, _ = block.context(x, rope, None, past=buffer, at=at)
        return self.output(self.norm(x))  # (B, 1, V)
