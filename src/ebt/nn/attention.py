"""Attention for the two streams of an autoregressive energy transformer.

The context stream is ordinary causal self-attention over real tokens. It never sees candidates,
so it only ever needs first-order gradients and runs on PyTorch's fused SDPA kernels.

The prediction stream holds one candidate per position. Candidate j attends to context keys
0..j+offset-1 (everything up to and including its own token x_j, plus a prepended step token when
there is one) and to itself, never to another candidate. Its attention must support double
backward (training differentiates the input gradient again), so it is written with plain
matmul/softmax, which autograd can differentiate any number of times.

Where nothing is differentiated (no_grad / inference_mode: evaluation, thinking at inference,
generation), the prediction stream can take a fused route instead (`fused_prediction_route`):
one `scaled_dot_product_attention` call, so no (B, H, R, Tc) score tensor is materialised. The
own key joins the context as an "anchor": the queries gain a channel holding the own score
(already computed elementwise), a key that is 1 in that channel sits first in the context and
every row may read it, and its value is 1 in that channel. The kernel's softmax over [anchor,
allowed context keys] is then exactly the softmax over [allowed context keys, own key]: the
output's first hd channels are the context part, its extra channel the own key's weight w, and
attended = context part + w v_own. No log-sum-exp is needed and a row without any context key
reads the anchor alone (w = 1). The channels are padded to a multiple of 8 (the fused kernels'
alignment): hd = 64 attends over 72. By default the route is taken on CUDA only; whether it is
faster than the explicit route there is for the GPU benchmark to measure.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

from ebt.nn.layers import at_least_float32
from ebt.nn.precision import wide

# "cuda": the fused prediction route on CUDA where nothing is differentiated (the default);
# "any": on every device (the tests force it on CPU); "off": never.
FUSED_PREDICTION_ATTENTION = "cuda"


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
    causal_offset: int | None = None,
) -> torch.Tensor:
    """Each candidate row attends to its allowed context keys and to its own key only.

    rotated_queries: RoPE'd queries already multiplied by 1/sqrt(hd) (the scale is folded into
    the rotation table, saving a pass over the scores); queries, keys, values: the same rows
    without RoPE or scale, (B, H, R, hd); context: RoPE'd keys and values (B, H, Tc, hd);
    mask: (R, Tc) additive. Softmax in float32 at least, as the paper's code does.
    causal_offset: given when the rows are 0..R-1, whose mask is then strictly causal (row r
    reads the keys before r + causal_offset): the fused route needs no mask. Returns
    (B, H, R, hd).
    """
    context_keys, context_values = context
    scale = queries.shape[-1] ** -0.5
    if fused_prediction_route(queries):
        self_score = (queries * keys).sum(-1, keepdim=True) * scale  # (B, H, R, 1)
        allowed = None if causal_offset is not None else mask == 0  # (R, Tc)
        anchored = anchored_queries(rotated_queries, self_score)  # (B, H, R, hd + E)
        out = anchored_attention(anchored, anchored_context(context), allowed, causal_offset)
        return merge_own_value(out, values)
    context_scores = rotated_queries @ context_keys.transpose(-1, -2) + mask  # (B, H, R, Tc)
    self_score = (queries * keys).sum(-1, keepdim=True) * scale  # (B, H, R, 1)
    scores = torch.cat((context_scores, self_score), dim=-1)  # (B, H, R, Tc + 1)
    weights = at_least_float32(scores).softmax(dim=-1).type_as(queries)
    context_weights, self_weight = split_weights(weights)
    return context_weights @ context_values + self_weight * values  # (B, H, R, hd)


def fused_prediction_route(x: torch.Tensor) -> bool:
    """Whether the prediction attention of x takes the fused route: nothing is differentiated
    (the fused kernels have no double backward), no graph is being traced (the route's
    backward asks autograd) and FUSED_PREDICTION_ATTENTION allows x's device."""
    setting = FUSED_PREDICTION_ATTENTION
    if setting == "off" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False  # compiling: its backward asks autograd, which breaks a one-graph trace
    return setting == "any" or x.device.type == "cuda"


def _extra_channels(width: int) -> int:
    """Channels added to hd: at least one (the anchor's), up to a multiple of 8."""
    return 8 - width % 8


def anchored_queries(rotated_queries: torch.Tensor, self_score: torch.Tensor) -> torch.Tensor:
    """Queries (..., R, hd) (RoPE'd, scaled) and their own scores (..., R, 1) -> (..., R, hd + E):
    the queries, the own score, zeros."""
    extra = _extra_channels(rotated_queries.shape[-1])
    joined = torch.cat((rotated_queries, self_score.to(rotated_queries.dtype)), dim=-1)
    return F.pad(joined, (0, extra - 1))  # (..., R, hd + E)


def anchored_context(context: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Context keys and values (..., Tc, hd) -> (..., 1 + Tc, hd + E) each: first the anchor
    (key and value 1 in channel hd, else 0), then the context with E zero channels."""
    keys, values = context
    width = keys.shape[-1]
    extra = _extra_channels(width)
    anchor = keys.new_zeros((*keys.shape[:-2], 1, width + extra))  # (..., 1, hd + E)
    anchor[..., width] = 1
    anchored_keys = torch.cat((anchor, F.pad(keys, (0, extra))), dim=-2)
    anchored_values = torch.cat((anchor.to(values.dtype), F.pad(values, (0, extra))), dim=-2)
    return anchored_keys, anchored_values


def anchored_attention(
    queries: torch.Tensor,
    context: tuple[torch.Tensor, torch.Tensor],
    allowed: torch.Tensor | None,
    causal_offset: int | None,
) -> torch.Tensor:
    """One fused SDPA of anchored queries (..., R, hd + E) over an anchored context: (..., R,
    hd + E). With causal_offset (rows 0..R-1), row r reads the anchor and the context keys
    before r + causal_offset: `causal_offset` zero rows are put first, so that the stock causal
    mask (query a reads keys 0..a) fits, then dropped. Else `allowed` (R, Tc) says which
    context keys each row reads (the anchor always)."""
    keys, values = context
    if causal_offset is not None:
        padded = F.pad(queries, (0, 0, causal_offset, 0))  # (..., offset + R, hd + E)
        # No row reads past key offset + R - 1: with as many keys as queries, the causal mask is
        # the same on every backend (top-left and bottom-right alignment agree).
        length = padded.shape[-2]
        keys, values = keys[..., :length, :], values[..., :length, :]  # (..., <= L, hd + E)
        out = F.scaled_dot_product_attention(padded, keys, values, is_causal=True, scale=1.0)
        return out[..., causal_offset:, :]
    mask = F.pad(allowed, (1, 0), value=True)  # (R, 1 + Tc): the anchor first
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=1.0)


def merge_own_value(out: torch.Tensor, own_values: torch.Tensor) -> torch.Tensor:
    """Attended rows (..., R, hd) from the anchored attention's output (..., R, hd + E): the
    context part plus the own key's weight (channel hd) times the own value (..., R, hd)."""
    width = own_values.shape[-1]
    return torch.addcmul(out[..., :width], out[..., width : width + 1], own_values)


class FusedContext(NamedTuple):
    """A layer's context on the fused route, for rows (B*H, R, ...) (candidate_gradient)."""

    keys: torch.Tensor  # (B*H, 1 + Tc, hd + E): anchored context keys
    values: torch.Tensor  # (B*H, 1 + Tc, hd + E): anchored context values
    allowed: torch.Tensor | None  # (R, Tc): the context keys each row reads; or, for rows 0..R-1,
    offset: int | None  # rows read the keys before row + offset (strictly causal)


def fused_context(keys, values, allowed, offset) -> FusedContext:
    """The anchored context of keys/values (B*H, Tc, hd), made of ordinary tensors (the fused
    backward saves them) also under inference_mode."""
    with torch.inference_mode(False):
        return FusedContext(*anchored_context((keys, values)), allowed, offset)


def fused_rows_forward(rotated, self_score, own_values, layer: FusedContext):
    """(attended rows (B*H, R, hd), what fused_rows_backward needs) of rotated scaled queries
    (B*H, R, hd), own scores (B*H, R, 1) and own values (B*H, R, hd): one SDPA, whose graph to
    the anchored queries is recorded (outside inference_mode) for the backward."""
    with torch.inference_mode(False), torch.enable_grad():
        queries = anchored_queries(rotated, self_score).requires_grad_()  # (B*H, R, hd + E)
        out = anchored_attention(queries, layer[:2], layer.allowed, layer.offset)
    return merge_own_value(out.detach(), own_values), (queries, out)


def fused_rows_backward(grad, own_values, kept) -> tuple[torch.Tensor, ...]:
    """(dE/d(rotated queries) (B*H, R, hd), dE/d(own scores) (B*H, R, 1), dE/d(own values)
    (B*H, R, hd)) from dE/d(attended) grad (B*H, R, hd): the fused kernel's own first-order
    backward gives dE/d(anchored queries), whose channel hd is the own score's."""
    queries, out = kept
    width = own_values.shape[-1]
    grad_own_weight = (wide(grad) * own_values).sum(-1, keepdim=True)  # (B*H, R, 1)
    with torch.inference_mode(False):
        grad_out = torch.cat((grad, grad_own_weight.to(grad.dtype)), dim=-1)  # (B*H, R, hd + 1)
        grad_out = F.pad(grad_out, (0, out.shape[-1] - width - 1)).to(out.dtype)
        (grad_queries,) = torch.autograd.grad(out, queries, grad_out)  # (B*H, R, hd + E)
    grad_values = wide(out[..., width : width + 1].detach()) * grad  # own weight x grad
    return grad_queries[..., :width], grad_queries[..., width : width + 1], grad_values
