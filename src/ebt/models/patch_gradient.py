"""The patch-token video EBT's energies and dE/dx, written out (models/patch_frames.py).

candidate_gradient.py's pass (RMSNorm, SwiGLU, adaLN, the residual streams and the energy head
with their vector-Jacobian products, its bf16 autocast policy) with the attention of a patch
frame in place of the one-token one: the P tokens of candidate group r (one candidate frame)
read the context keys of frames <= rows[r] (and the step token) and all P tokens of their own
group, never another group's. The own-group scores are computed per group, (P, P) each, so
neither direction spends anything on the (R P, R P) block that the mask would zero.

- inference (first order): run under inference_mode, nothing is recorded;
- training (second order): run with grad enabled, autograd records these ops and the loss's
  backward differentiates the written-out gradient once: a first-order graph, no
  `create_graph` double backward.

Candidates enter through PatchTokens (patchify, Linear(3 p^2, D) with bias, a position table),
so dE/dx = unpatchify(dE/dz @ W). Tests check energies, dE/dx and the training gradients
against autograd of the same model in float64, and bf16 autocast against float64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from ebt.models.candidate_gradient import stream_and_gradient
from ebt.models.row_ops import batched, linear, rotate, unbatched
from ebt.nn.precision import wide

if TYPE_CHECKING:
    from ebt.models.context_cache import ContextCache
    from ebt.models.patch_frames import PatchFrameEnergyTransformer

Saved = tuple[Tensor, ...]


class PatchContext(NamedTuple):
    """What one layer's prediction attention reads besides the candidates."""

    keys: Tensor  # (B*H, Tc, hd): the context stream's keys (rotated)
    values: Tensor  # (B*H, Tc, hd)
    mask: Tensor  # (R P, Tc) additive: 0 where a candidate token may read the key, else -inf
    per_frame: int  # P, the tokens of one candidate group


def _grouped(x: Tensor, per: int) -> Tensor:
    """(B*H, R P, c) -> (B*H*R, P, c): one batch entry per candidate group."""
    return x.reshape(-1, per, x.shape[-1])


def _attention_forward(block, x: Tensor, ropes, context: PatchContext, shape) -> tuple:
    """Attention output rows (N, D) of candidate rows x (N, D), N = B R P; ropes = (plain,
    scaled by 1/sqrt(hd)) rotations (R P, 1, hd/2); shape = (B, R P, H, hd)."""
    attention, per = block.attention, context.per_frame
    q, k, v = (linear(x, getattr(attention, f"w{name}")).view(shape) for name in "qkv")
    queries = batched(rotate(q, ropes[1]), shape)  # (B*H, R P, hd), scaled by 1/sqrt(hd)
    keys = batched(rotate(k, ropes[0]), shape)  # (B*H, R P, hd)
    values = batched(v, shape)  # (B*H, R P, hd)
    scores = wide(torch.baddbmm(context.mask, queries, context.keys.transpose(1, 2)))
    own = torch.bmm(_grouped(queries, per), _grouped(keys, per).transpose(1, 2))  # (B*H*R, P, P)
    own = wide(own).view(*scores.shape[:2], per)  # (B*H, R P, P)
    weights = torch.cat((scores, own), dim=-1).softmax(-1)  # (B*H, R P, Tc + P)
    context_weights, own_weights = weights.split((scores.shape[-1], per), dim=-1)
    own_attended = torch.bmm(_grouped(own_weights, per), _grouped(values, per))  # (B*H*R, P, hd)
    attended = torch.baddbmm(own_attended.view(queries.shape), context_weights, context.values)
    out = linear(unbatched(attended, shape).reshape(x.shape), attention.wo)  # (N, D)
    return out, (queries, keys, values, weights)


def _attention_backward(block, grad: Tensor, saved: Saved, ropes, context, shape) -> Tensor:
    """dE/dx (N, D) of the attention input from dE/d(output) grad (N, D)."""
    attention, per = block.attention, context.per_frame
    queries, keys, values, weights = saved  # (B*H, R P, hd) x 3, (B*H, R P, Tc + P)
    grad = batched(torch.mm(grad, attention.wo.weight).view(shape), shape)  # (B*H, R P, hd)
    grad_context = wide(torch.bmm(grad, context.values.transpose(1, 2)))  # (B*H, R P, Tc)
    grad_own = torch.bmm(_grouped(grad, per), _grouped(values, per).transpose(1, 2))
    grad_weights = torch.cat((grad_context, wide(grad_own).view(*grad_context.shape[:2], per)), -1)
    dot = (grad_weights * weights).sum(-1, keepdim=True)  # (B*H, R P, 1)
    grad_scores = weights * (grad_weights - dot)  # (B*H, R P, Tc + P): the softmax backward
    context_scores, own_scores = grad_scores.split((grad_context.shape[-1], per), dim=-1)
    own_scores = _grouped(own_scores, per)  # (B*H*R, P, P)
    own_queries = torch.bmm(own_scores, _grouped(keys, per)).view(grad.shape)  # (B*H, R P, hd)
    grad_queries = torch.baddbmm(own_queries, context_scores, context.keys)
    grad_keys = torch.bmm(own_scores.transpose(1, 2), _grouped(queries, per))  # (B*H*R, P, hd)
    own_weights = _grouped(weights.split((grad_context.shape[-1], per), dim=-1)[1], per)
    grad_values = torch.bmm(own_weights.transpose(1, 2), _grouped(grad, per))  # (B*H*R, P, hd)
    parts = (
        (rotate(unbatched(grad_queries, shape), ropes[1].conj()), attention.wq),
        (rotate(unbatched(grad_keys.view(grad.shape), shape), ropes[0].conj()), attention.wk),
        (unbatched(grad_values.view(grad.shape), shape), attention.wv),
    )  # dE/d(q, k, v) (B, R P, H, hd) each, with the weight that made them
    rows = (-1, shape[2] * shape[3])
    total = torch.mm(parts[0][0].reshape(rows), parts[0][1].weight)  # (N, D)
    for part, layer in parts[1:]:
        total = torch.addmm(total, part.reshape(rows), layer.weight)
    return total


PATCH_FRAME = (_attention_forward, _attention_backward)


def energies_and_gradient(
    model: PatchFrameEnergyTransformer,
    cache: ContextCache,
    frames: Tensor,
    rows: Tensor | None = None,
    landscape: int | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(energies (B, R), dE/dx (B, R, frame_dim)) of candidate frames x (B, R, frame_dim);
    arguments as PatchFrameEnergyTransformer.energies, noise (B, R P, D) Langevin noise added
    to the embedded patch tokens. Differentiable (once) when run with grad enabled."""
    batch, count, _ = frames.shape
    per = model.patches.count
    if rows is None:
        rows = torch.arange(count, device=frames.device)
    landscape = cache.landscape if landscape is None else landscape
    width = model.args.dim // model.args.heads
    shape = (batch, count * per, model.args.heads, width)
    z = wide(model.embed_candidates(frames, landscape, noise)).flatten(0, 1)  # (N, D)
    rope = model._rope(model._candidate_positions(rows)).unsqueeze(1)  # (R P, 1, hd/2)
    ropes = (rope, rope * width**-0.5)
    mask = model._context_mask(rows, cache.length, z.dtype)  # (R P, Tc)
    contexts = [
        PatchContext(k.flatten(0, 1), v.flatten(0, 1), mask, per)
        for k, v in zip(cache.keys, cache.values, strict=True)
    ]
    energies, grad = stream_and_gradient(
        model, z, ropes, contexts, cache.condition, shape, PATCH_FRAME
    )  # (N, 1), (N, D)
    gradient = torch.mm(grad, model.patches.linear.weight).view(batch, count, per, -1)
    gradient = model.patches.frames_of(gradient).to(frames.dtype)  # (B, R, frame_dim)
    return energies.view(batch, count, per).sum(-1), gradient  # (B, R), (B, R, frame_dim)
