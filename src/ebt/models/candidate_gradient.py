"""Energies and their gradient with respect to the candidates, written out by hand.

Recording the prediction stream for autograd and asking autograd for dE/dp costs about three
times the kernels the arithmetic needs (views, transposes, saved tensors, engine bookkeeping).
Here the forward and its vector-Jacobian product are written out: the same arithmetic as
autograd's, on 2-D row tensors, in fewer kernels.

The same code serves both uses of the candidate gradient:
- inference (first order): run under inference_mode, nothing is recorded;
- training (second order): run with grad enabled, autograd records these ops like any others
  and the final backward differentiates the written-out gradient. The training graph is then
  first-order (no `create_graph` double backward), with fewer and fused elementwise kernels.

`extend_context_by_one` is generation's one-token context pass in the same style. Tests check
both uses against autograd of the naive float64 model for every variant.

Under bf16 (or fp16) autocast the matrix products run in the autocast dtype; RMSNorm statistics,
RoPE rotations, softmax, the attention's row sums, the residual streams (of the activations and
of dE/dz), the adaLN modulations and the energy head run in float32, written out with explicit
dtypes (`ebt.nn.precision`) because CPU and CUDA autocast widen different ops. The SwiGLU
elementwise ops stay in the products' dtype, as autocast leaves them in the autograd model.
Outside autocast nothing changes: float32 and float64 run exactly as before.

Candidates enter through one Linear (text: the projection of distributions; video: the frame
embedding, with a bias, which a gradient does not see), so dE/dx = dE/dz @ W for both.
Patch-token video frames (patch_gradient.py) run the same blocks (`stream_and_gradient`) with
their own attention. The row-tensor pieces both share (Linear, RMSNorm, adaLN, RoPE, head
batching) are in row_ops.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ebt.models.row_ops import (
    Saved,
    batched,
    gated,
    linear,
    linear_backward,
    modulated,
    rms_backward,
    rms_forward,
    rotate,
    unbatched,
    unmodulated,
)
from ebt.nn.attention import (
    FusedContext,
    fused_context,
    fused_prediction_route,
    fused_rows_backward,
    fused_rows_forward,
    prediction_mask,
    split_weights,
)
from ebt.nn.block import Block
from ebt.nn.kv_cache import KeyValueBuffer, StaticKeyValueBuffer, position_mask
from ebt.nn.precision import full_precision, no_autograd, wide

if TYPE_CHECKING:
    from ebt.models.context_cache import ContextCache
    from ebt.models.energy_transformer import EnergyTransformer

# A chunk of the prediction attention: (its number of rows, their additive mask (r, k), the
# context keys and values they read (B*H, k, hd) each).
Piece = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]

SPLIT_MIN_ROWS = 32  # from this many candidate rows on, the attention splits them in two


def row_chunks(count: int, context_length: int, offset: int) -> list[tuple[int, int]]:
    """(rows, context keys read) per chunk for the candidate rows 0..count-1.

    Row r reads the context keys i < r + offset only, so the first half of the rows never reads
    the last keys: computing the halves separately skips those masked scores, a quarter of the
    attention's matmul work (measured 2-4% of a training step on the issue-2 setting; four
    chunks were slower, the smaller kernels costing more than they save).
    """
    if count < SPLIT_MIN_ROWS:
        return [(count, context_length)]
    half = count // 2
    return [(half, min(context_length, half - 1 + offset)), (count - half, context_length)]


def _pieces(keys, values, mask, chunks: list[tuple[int, int]]) -> list[Piece]:
    """Each chunk's mask rows and the leading context keys/values it reads (split, whose
    backward is one cat, rather than slices, whose backwards each fill a full-size zero tensor)."""
    pieces, start = [], 0
    for rows, count in chunks:
        read = _leading(keys, count), _leading(values, count)
        pieces.append((rows, mask[start : start + rows, :count], *read))
        start += rows
    return pieces


def _leading(x: torch.Tensor, count: int) -> torch.Tensor:
    """The first count positions of x (B*H, T, hd)."""
    length = x.shape[1]
    return x if count == length else x.split((count, length - count), 1)[0]


def _chunked(pieces: list[Piece], *tensors: torch.Tensor):
    """Per chunk: (its piece, the chunk's rows of each tensor (B*H, R, ...))."""
    sizes = [piece[0] for piece in pieces]
    parts = zip(*(tensor.split(sizes, 1) for tensor in tensors), strict=True)
    return zip(pieces, parts, strict=True)


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # along rows


def _attention_forward(block: Block, x, rope, pieces, shape) -> tuple[torch.Tensor, Saved]:
    """Prediction attention of candidate rows x (N, D), as Block.prediction and
    prediction_attention compute it, chunk by chunk of rows (or on the fused route, pieces a
    FusedContext); shape = (B, R, H, hd)."""
    attention = block.attention
    q, k, v = (linear(x, getattr(attention, f"w{name}")).view(shape) for name in "qkv")
    rotated = batched(rotate(q, rope), shape)  # (B*H, R, hd), scaled by 1/sqrt(hd)
    self_score = batched((wide(q) * k).sum(-1, keepdim=True), shape) * shape[-1] ** -0.5
    own_values = batched(v, shape)  # (B*H, R, hd), a copy: kept for the backward
    if isinstance(pieces, FusedContext):
        attended, kept = fused_rows_forward(rotated, self_score, own_values, pieces)
    else:
        attended, kept = _explicit_forward(rotated, self_score, own_values, pieces)
    out = linear(unbatched(attended, shape).reshape(x.shape), attention.wo)  # (N, D)
    return out, (q, k, own_values, kept)


def _explicit_forward(rotated, self_score, own_values, pieces: list[Piece]):
    """(attended rows (B*H, R, hd), per chunk its softmax weights (B*H, r, k + 1)) with the
    scores written out, chunk by chunk of rows."""
    attended, weights = [], []
    chunks = _chunked(pieces, rotated, self_score, own_values)
    for (_, mask, keys, values), (queries, own_score, own_value) in chunks:
        scores = wide(torch.baddbmm(mask, queries, keys.transpose(1, 2)))  # (B*H, r, k)
        chunk_weights = torch.cat((scores, own_score), dim=-1).softmax(-1)  # (B*H, r, k + 1)
        context_weights, self_weight = split_weights(chunk_weights)
        attended.append(torch.baddbmm(self_weight * own_value, context_weights, values))
        weights.append(chunk_weights)
    return _join(attended), weights


def _attention_backward(block: Block, grad, saved: Saved, rope, pieces, shape) -> torch.Tensor:
    """dE/dx (N, D) of the attention input from dE/d(output) (N, D)."""
    attention = block.attention
    q, k, own_values, kept = saved  # (B, R, H, hd) x 2, (B*H, R, hd), the route's own
    grad = batched(torch.mm(grad, attention.wo.weight).view(shape), shape)  # (B*H, R, hd)
    if isinstance(pieces, FusedContext):
        grads = fused_rows_backward(grad, own_values, kept)
    else:
        grads = _explicit_backward(grad, own_values, kept, pieces)
    return _input_gradient(attention, q, k, grads, rope, shape)


def _explicit_backward(grad, own_values, weights, pieces: list[Piece]) -> Saved:
    """(dE/d(rotated queries) (B*H, R, hd), dE/d(self scores) (B*H, R, 1), dE/d(own values)
    (B*H, R, hd)) from dE/d(attended) grad (B*H, R, hd) and each chunk's softmax weights."""
    grad_rotated, grad_self, grad_v = [], [], []
    chunks = _chunked(pieces, grad, own_values)
    for ((_, _, keys, values), (chunk_grad, own_value)), chunk_weights in zip(
        chunks, weights, strict=True
    ):
        self_weight = split_weights(chunk_weights)[1]
        grad_self_weight = (wide(chunk_grad) * own_value).sum(-1, keepdim=True)  # (B*H, r, 1)
        grad_context_weights = wide(torch.bmm(chunk_grad, values.transpose(1, 2)))  # (B*H, r, k)
        grad_weights = torch.cat((grad_context_weights, grad_self_weight), -1)
        dot = (grad_weights * chunk_weights).sum(-1, keepdim=True)  # (B*H, r, 1)
        grad_context_scores, grad_self_score = split_weights(chunk_weights * (grad_weights - dot))
        grad_rotated.append(torch.bmm(grad_context_scores, keys))  # (B*H, r, hd)
        grad_self.append(grad_self_score)
        grad_v.append(self_weight * chunk_grad)
    return _join(grad_rotated), _join(grad_self), _join(grad_v)


def _input_gradient(attention, q, k, grads: Saved, rope, shape) -> torch.Tensor:
    """dE/dx (N, D) of the attention input from dE/d(rotated queries) (B*H, R, hd), dE/d(self
    scores) (B*H, R, 1) and dE/d(values) (B*H, R, hd); q, k (B, R, H, hd)."""
    grad_rotated = unbatched(grads[0], shape)  # (B, R, H, hd)
    grad_self = unbatched(grads[1], shape) * shape[-1] ** -0.5  # (B, R, H, 1)
    grad_q = torch.addcmul(rotate(grad_rotated, rope.conj()), grad_self, k)  # (B, R, H, hd)
    grad_v = unbatched(grads[2], shape)  # (B, R, H, hd)
    rows = (-1, q.shape[2] * q.shape[3])
    total = torch.mm(grad_q.reshape(rows), attention.wq.weight)  # (N, D)
    total = torch.addmm(total, (grad_self * q).reshape(rows), attention.wk.weight)
    return torch.addmm(total, grad_v.reshape(rows), attention.wv.weight)


def _feed_forward(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, Saved]:
    ffn = block.feed_forward
    gate, up = linear(x, ffn.w1), linear(x, ffn.w3)  # (N, F) each
    sigmoid = torch.sigmoid(gate)
    silu = gate * sigmoid
    return linear(silu * up, ffn.w2), (gate, up, sigmoid, silu)


def _feed_forward_backward(block: Block, grad: torch.Tensor, saved: Saved) -> torch.Tensor:
    ffn = block.feed_forward
    gate, up, sigmoid, silu = saved
    grad = linear_backward(grad, ffn.w2)  # (N, F)
    grad_gate = grad * up * (sigmoid * (1 + gate * (1 - sigmoid)))
    return torch.addmm(linear_backward(grad_gate, ffn.w1), grad * silu, ffn.w3.weight)


def _block_forward(block, z, rope, mod, pieces, shape, attend) -> tuple[torch.Tensor, Saved]:
    """Block.prediction on candidate rows z (N, D), keeping what the backward needs; attend:
    the attention's (forward, backward) pair (ONE_TOKEN, or patch_gradient's)."""
    normed, attention_norm = rms_forward(z, block.attention_norm)
    attention_input = modulated(normed, mod, 0)
    attended, attention = attend[0](block, attention_input, rope, pieces, shape)
    h = z + gated(attended, mod, 2)  # (N, D)
    normed, ffn_norm = rms_forward(h, block.ffn_norm)
    out, ffn = _feed_forward(block, modulated(normed, mod, 3))
    return h + gated(out, mod, 5), (attention_norm, attention, ffn_norm, ffn)


def _block_backward(block, grad, saved, rope, mod, pieces, shape, attend) -> torch.Tensor:
    attention_norm, attention, ffn_norm, ffn = saved
    inner = _feed_forward_backward(block, gated(grad, mod, 5), ffn)
    grad = grad + rms_backward(unmodulated(inner, mod, 3), block.ffn_norm, ffn_norm)
    inner = attend[1](block, gated(grad, mod, 2), attention, rope, pieces, shape)
    return grad + rms_backward(unmodulated(inner, mod, 0), block.attention_norm, attention_norm)


def _context_block(block, x, ropes, mod, buffer, shape, last, at=None) -> torch.Tensor | None:
    """Block.context for one new token per row x (B, D), appending its keys/values to the
    layer's buffer; ropes = (plain, scaled by 1/sqrt(hd)) rotations (1, 1, hd/2). at: for a
    StaticKeyValueBuffer, (position (1,), additive mask (1, C) of the keys up to it)."""
    attention = block.attention
    x = wide(x)  # (B, D)
    normed, _ = rms_forward(x, block.attention_norm)
    attention_input = modulated(normed, mod, 0)
    k = rotate(linear(attention_input, attention.wk).view(shape), ropes[0])  # (B, 1, H, hd)
    v = linear(attention_input, attention.wv).view(shape)  # (B, 1, H, hd)
    if at is None:
        keys, values = buffer.append(k.transpose(1, 2), v.transpose(1, 2))  # (B, H, P + 1, hd)
    else:  # fixed capacity: (B, H, C, hd), the positions after `at` masked below
        keys, values = buffer.write(k.transpose(1, 2), v.transpose(1, 2), at[0])
    if last:  # the energy head never reads the context stream's last output
        return None
    q = rotate(linear(attention_input, attention.wq).view(shape), ropes[1])
    scores = q.transpose(1, 2) @ keys.transpose(-1, -2)  # (B, H, 1, P + 1 or C)
    if at is not None:
        scores = scores + at[1]
    weights = wide(scores).softmax(-1)  # (B, H, 1, P + 1)
    attended = (weights @ values).transpose(1, 2).reshape(x.shape)  # (B, D)
    h = x + gated(linear(attended, attention.wo), mod, 2)  # (B, D)
    normed, _ = rms_forward(h, block.ffn_norm)
    out, _ = _feed_forward(block, modulated(normed, mod, 3))
    return h + gated(out, mod, 5)


def extend_context_by_one(
    model: EnergyTransformer,
    buffers: list[KeyValueBuffer] | list[StaticKeyValueBuffer],
    condition: torch.Tensor | None,
    tokens: torch.Tensor,
    position: torch.Tensor | None = None,
) -> None:
    """Append one token per row (B, 1) to a context cache's per-layer buffers, in place.

    position (1,) (StaticKeyValueBuffers, graph decoding): write the token there and attend to
    the keys up to it; the shapes do not depend on it, so one traced graph serves every token.
    """
    with no_autograd():
        batch = tokens.shape[0]
        shape = (batch, 1, model.args.heads, model.args.dim // model.args.heads)
        at = None
        if position is None:
            position = torch.tensor([buffers[0].length], device=tokens.device)
        else:
            keys = buffers[0].keys  # (B, H, C, hd)
            at = (position, position_mask(position, keys.shape[2], keys.dtype))  # (1,), (1, C)
        rope = model._rope(position).unsqueeze(1)  # (1, 1, hd/2)
        ropes = (rope, rope * shape[-1] ** -0.5)  # (1, 1, hd/2) each
        x = model.embed_context(tokens[:, 0])  # (B, D): one token id or frame per row
        last = len(model.blocks) - 1
        for index, (block, buffer) in enumerate(zip(model.blocks, buffers, strict=True)):
            mod = _row_modulation(block, condition, 1)
            x = _context_block(block, x, ropes, mod, buffer, shape, index == last, at)


def _row_modulation(block: Block, condition: torch.Tensor | None, per_row: int) -> tuple | None:
    """A block's six adaLN vectors, repeated for each of a batch row's candidates: 6 x (N, D),
    in float32 at least."""
    if block.modulation is None:
        return None
    return wide(block.modulation(condition)).repeat_interleave(per_row, dim=0).chunk(6, dim=-1)


def energies_and_gradient(
    model: EnergyTransformer,
    cache: ContextCache,
    probabilities: torch.Tensor,
    rows: torch.Tensor | None = None,
    landscape: int | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(energies (B, R), dE/dp (B, R, V)) of candidates p (B, R, V) (or frames (B, R, F));
    arguments as energies(), noise (B, R, D) Langevin noise added to the embedded candidates.

    Differentiable (to any order autograd supports) when run with grad enabled.
    """
    batch, count, _ = probabilities.shape
    chunks = [(count, cache.length)]  # rows given (e.g. generation's newest): one chunk
    offset = None  # rows 0..R-1: strictly causal with model.offset (the fused route's mask)
    if rows is None:  # every position (training, batch thinking): split the rows
        chunks = row_chunks(count, cache.length, model.offset)
        rows = torch.arange(count, device=probabilities.device)
        offset = model.offset
    landscape = cache.landscape if landscape is None else landscape
    shape = (batch, count, model.args.heads, model.args.dim // model.args.heads)
    z = model.embed_candidates(probabilities, landscape, noise, zero_leaf_as_bias=True)
    z = wide(z).flatten(0, 1)  # (N, D): the residual stream in float32 at least
    rope = model._rope(rows + model.offset).unsqueeze(1) * shape[-1] ** -0.5  # (R, 1, hd/2)
    mask = prediction_mask(rows, cache.length, model.offset, z.dtype)  # (R, Tc)
    pieces = _layer_contexts(cache, mask, chunks, offset, fused_prediction_route(z))
    energies, grad = stream_and_gradient(model, z, rope, pieces, cache.condition, shape)
    gradient = linear_backward(grad, model.candidate_layer).to(probabilities.dtype)  # (N, V)
    return energies.view(batch, count), gradient.view(batch, count, -1)  # (B, R), (B, R, V)


ONE_TOKEN = (_attention_forward, _attention_backward)  # each candidate: the context + itself


def stream_and_gradient(
    model: EnergyTransformer, z, rope, contexts: list, condition, shape, attend=ONE_TOKEN
) -> tuple[torch.Tensor, torch.Tensor]:
    """(energies (N, 1), dE/dz (N, D)) of candidate rows z (N, D) through the prediction
    stream: every block forward, the energy head, every block backward. contexts: per layer,
    what `attend` (the attention's (forward, backward)) reads; shape = (B, R, H, hd), R rows
    per batch row (their adaLN vectors repeated R times)."""
    layers = list(zip(model.blocks, contexts, strict=True))
    mods = [_row_modulation(block, condition, shape[1]) for block in model.blocks]
    saved = []
    for (block, context), mod in zip(layers, mods, strict=True):
        z, kept = _block_forward(block, z, rope, mod, context, shape, attend)
        saved.append(kept)
    energies, grad = _energy_head(model, z, condition, shape[1])  # (N, 1), (N, D)
    for (block, context), mod, kept in reversed(list(zip(layers, mods, saved, strict=True))):
        grad = _block_backward(block, grad, kept, rope, mod, context, shape, attend)
    return energies, grad


def _layer_contexts(cache: ContextCache, mask, chunks, offset: int | None, fused: bool) -> list:
    """Per layer, the context keys/values (B*H, Tc, hd) as the attention reads them: per chunk
    of rows (rows, mask (r, k), keys, values); or, on the fused route (nothing differentiated),
    a FusedContext (rows 0..R-1: strictly causal with `offset`; others: the mask's pattern)."""
    contexts = zip(cache.keys, cache.values, strict=True)
    if fused:
        allowed = None if offset is not None else mask == 0  # (R, Tc)
        return [
            fused_context(k.flatten(0, 1), v.flatten(0, 1), allowed, offset) for k, v in contexts
        ]
    return [_pieces(k.flatten(0, 1), v.flatten(0, 1), mask, chunks) for k, v in contexts]


def _energy_head(model: EnergyTransformer, z, condition, count: int):
    """(energies (N, 1), dE/dz (N, D)) of the last block's output rows z (N, D)."""
    z, final_norm = rms_forward(z, model.norm)
    grad = model.energy_head.weight.expand_as(z)  # (N, D): dE/d(head input)
    if model.final_modulation is not None:
        shift, scale = wide(model.final_modulation(condition)).chunk(2, dim=-1)  # (B, D) each
        shift, scale = shift.repeat_interleave(count, 0), scale.repeat_interleave(count, 0)
        z = torch.addcmul(shift, z, 1 + scale)  # (N, D)
        grad = grad * (1 + scale)
    with full_precision(z):  # the energy itself in float32 at least, also under autocast
        energies = linear(z, model.energy_head)  # (N, 1)
    return energies, rms_backward(grad, model.norm, final_norm)
