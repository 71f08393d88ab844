"""Attention for the two streams of an autoregressive energy transformer.

The context stream is ordinary causal self-attention over real tokens. It never sees candidates,
so it only ever needs first-order gradients and runs on PyTorch's fused SDPA kernels.

The prediction stream holds one candidate per position. Candidate j attends to context keys
0..j+offset-1 (everything up to and including its own token x_j, plus a prepended step token when
there is one) and to itself, never to another candidate. Its attention must support double
backward (training differentiates the input gradient again), so it is written with plain
matmul/softmax, which autograd can differentiate any number of times.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ebt.nn.layers import at_least_float32


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused causal attention; first-order gradients only.

    q (B, H, T, hd) are the last T of the Tk >= T positions in k, v (B, H, Tk, hd): query t
    sees keys up to Tk - T + t (plain causal self-attention when Tk == T).
    """
    queries, keys = q.shape[2], k.shape[2]
    if queries == keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if queries == 1:  # one new token sees everything cached
        return F.scaled_dot_product_attention(q, k, v)
    rows = torch.arange(queries, device=q.device).unsqueeze(1) + (keys - queries)  # (T, 1)
    allowed = torch.arange(keys, device=q.device).unsqueeze(0) <= rows  # (T, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def prediction_mask(
    rows: torch.Tensor, context_length: int, offset: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask (R, Tc): row r may read context keys i < rows[r] + offset, else -inf."""
    keys = torch.arange(context_length, device=rows.device)  # (Tc,)
    allowed = keys.unsqueeze(0) < (rows.unsqueeze(1) + offset)  # (R, Tc)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=rows.device)
    return mask.masked_fill(~allowed, float("-inf"))


def split_weights(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(context weights (B, H, R, Tc), self weight (B, H, R, 1)).

    split (whose backward is one cat) rather than two slices (whose backwards each fill a zero
    tensor of the full score size): the double backward runs through this every step.
    """
    context_weights, self_weight = weights.split((weights.shape[-1] - 1, 1), dim=-1)
    return context_weights, self_weight


def prediction_attention(
    rotated_queries: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    context: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
) -> torch.Tensor:
    """Each candidate row attends to its allowed context keys and to its own key only.

    rotated_queries: RoPE'd queries already multiplied by 1/sqrt(hd) (the scale is folded into
    the rotation table, saving a pass over the scores); queries, keys, values: the same rows
    without RoPE or scale, (B, H, R, hd); context: RoPE'd keys and values (B, H, Tc, hd);
    mask: (R, Tc) additive. Softmax in float32 at least, as the paper's code does.
    Returns (B, H, R, hd).
    """
    context_keys, context_values = context
    scale = queries.shape[-1] ** -0.5
    context_scores = rotated_queries @ context_keys.transpose(-1, -2) + mask  # (B, H, R, Tc)
    self_score = (queries * keys).sum(-1, keepdim=True) * scale  # (B, H, R, 1)
    scores = torch.cat((context_scores, self_score), dim=-1)  # (B, H, R, Tc + 1)
    weights = at_least_float32(scores).softmax(dim=-1).type_as(queries)
    context_weights, self_weight = split_weights(weights)
    return context_weights @ context_values + self_weight * values  # (B, H, R, hd)
