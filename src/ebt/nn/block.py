"""A pre-norm llama block that can run either stream of the energy transformer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ebt.nn.attention import causal_attention, prediction_attention
from ebt.nn.kv_cache import KeyValueBuffer
from ebt.nn.layers import RMSNorm, SwiGLU, apply_rope, modulate

Rope = torch.Tensor  # complex rotations (T, hd/2)


class Attention(nn.Module):
    """Query/key/value/output projections (no biases); the attention pattern is the caller's."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))  # (B, T, H, hd)

    def project(self, x: torch.Tensor, names: str) -> tuple[torch.Tensor, ...]:
        """Projections named by letters of "qkv", split into heads (B, T, H, hd) each.

        (Concatenating the weights into one matmul was measured slower on CPU: the larger
        matmul gains nothing and the concatenation costs a copy in every pass.)
        """
        return tuple(self.heads_of(getattr(self, f"w{name}")(x)) for name in names)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(x.transpose(1, 2).flatten(2))  # (B, T, D)


class Block(nn.Module):
    """h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h)), optionally adaLN-modulated."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, eps: float, adaln: bool) -> None:
        super().__init__()
        self.attention = Attention(dim, heads)
        self.feed_forward = SwiGLU(dim, ffn_dim)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if adaln else None

    def _modulation(self, condition: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
        if self.modulation is None:
            return None
        return self.modulation(condition).chunk(6, dim=-1)  # 6 x (B, D)

    def _attention_input(self, x: torch.Tensor, mod: tuple | None) -> torch.Tensor:
        normed = self.attention_norm(x)
        return normed if mod is None else modulate(normed, mod[0], mod[1])

    def _finish(self, x: torch.Tensor, attended: torch.Tensor, mod: tuple | None) -> torch.Tensor:
        if mod is None:
            h = x + attended
            return h + self.feed_forward(self.ffn_norm(h))
        h = x + mod[2].unsqueeze(1) * attended
        ffn = self.feed_forward(modulate(self.ffn_norm(h), mod[3], mod[4]))
        return h + mod[5].unsqueeze(1) * ffn

    def context(
        self,
        x: torch.Tensor,
        rope: Rope,
        condition: torch.Tensor | None,
        keys_only: bool = False,
        past: tuple[torch.Tensor, torch.Tensor] | KeyValueBuffer | None = None,
        at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Causal self-attention over real tokens x (B, T, D); returns (out, keys, values).

        With keys_only the block stops after computing its keys/values (the energy head never
        reads the context stream's last output, so the last block needs nothing more). With
        past (keys, values (B, H, P, hd) of earlier tokens, or a KeyValueBuffer holding them, which
        is then appended to in place), x holds the next T tokens, which attend to the past and
        causally to each other; the returned keys/values cover P + T. at = (position (1,), the
        keys it may read (1, C)) with past a StaticKeyValueBuffer: one token is written at
        position and attends to the capacity's keys up to it (graph decoding: fixed shapes).
        """
        mod = self._modulation(condition)
        normed = self._attention_input(x, mod)
        k, v = self.attention.project(normed, "kv")  # (B, T, H, hd) each
        k, v = apply_rope(k, rope).transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if at is not None:
            k, v = past.write(k, v, at[0])  # (B, H, C, hd) each
        elif isinstance(past, KeyValueBuffer):
            k, v = past.append(k, v)  # (B, H, P + T, hd) each
        elif past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        if keys_only:
            return None, k, v
        (q,) = self.attention.project(normed, "q")
        q = apply_rope(q, rope).transpose(1, 2)  # (B, H, T, hd)
        if at is None:
            attended = causal_attention(q, k, v)  # (B, H, T, hd)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=at[1])  # (B, H, 1, hd)
        attended = self.attention.merge(attended)  # (B, T, D)
        return self._finish(x, attended, mod), k, v

    def prediction(
        self,
        z: torch.Tensor,
        rope: Rope,
        condition: torch.Tensor | None,
        context: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        causal_offset: int | None = None,
    ) -> torch.Tensor:
        """Candidates z (B, R, D) read the cached context keys/values and themselves only
        (causal_offset: see prediction_attention)."""
        mod = self._modulation(condition)
        q, k, v = self.attention.project(self._attention_input(z, mod), "qkv")  # (B, R, H, hd)
        # A candidate's key only meets its own query, at the same position; rotations preserve
        # dot products, so the self score needs no RoPE and only the context scores do. The
        # caller may pre-scale the rotations by 1/sqrt(hd) (see prediction_attention).
        rotated_q = apply_rope(q, rope).transpose(1, 2)  # (B, H, R, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, R, hd)
        attended = prediction_attention(rotated_q, q, k, v, context, mask, causal_offset)
        return self._finish(z, self.attention.merge(attended), mod)
