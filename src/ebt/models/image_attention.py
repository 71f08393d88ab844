"""The image energy's attention and its written-out derivative, as autograd.Functions whose own
derivative is written out too (part of image_gradient.py's pass; see its docstring).

Rows are (M, D) with M = B * N (images times patches); the heads layout is (B*H, N, hd). Under
autocast the bmm operands are cast to the dtype of q/k/v (the products' one) explicitly and
the backward runs with autocast off, so the same dtypes hold whatever state it runs in; the
softmax, its backward and the row sums stay in float32 at least.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ebt.nn.precision import full_precision, wide

Saved = tuple[torch.Tensor, ...]
Shape = tuple[int, int, int, int]  # (B, N, H, hd): images, patches per image, heads, head width


def _to_heads(rows: Tensor, shape: Shape, count: int, bias: Tensor | None = None) -> Tensor:
    """Rows (M, count * D) -> (count, B*H, N, hd) contiguous (one pass); count 3: q, k, v
    after adding bias (3D,) if given."""
    batch, patches, heads, width = shape
    x = rows.view(batch, patches, count, heads, width).permute(2, 0, 3, 1, 4)  # (c, B, H, N, hd)
    if count == 1 and bias is None:
        return x.reshape(1, batch * heads, patches, width)
    parts = rows.new_empty(count, batch * heads, patches, width)
    if bias is None:
        parts.view(x.shape).copy_(x)
    else:
        torch.add(x, bias.view(count, 1, heads, 1, width), out=parts.view(x.shape))
    return parts


def _to_rows(x: torch.Tensor, shape: Shape) -> torch.Tensor:
    """(count, B*H, N, hd) -> rows (M, count * D) (one pass); inverse of _to_heads without its
    bias."""
    batch, patches, heads, width = shape
    x = x.view(-1, batch, heads, patches, width).permute(1, 3, 0, 2, 4)  # (B, N, c, H, hd)
    return x.reshape(batch * patches, -1)


def _softmax_backward(grad: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """dE/d(scores) (B*H, N, N) of softmax weights from dE/d(weights)."""
    weighted = grad * weights  # (B*H, N, N)
    return torch.addcmul(weighted, weights, weighted.sum(dim=-1, keepdim=True), value=-1.0)


class _Attention(torch.autograd.Function):
    """Softmax attention of rows qkv (M, 3D) + bias (3D,), the queries already scaled by
    1/sqrt(hd) (see _fold): (output rows (M, D), q, k, v as (3, B*H, N, hd), weights
    (B*H, N, N)), the last two for _AttentionGradient."""

    @staticmethod
    def forward(ctx, qkv: Tensor, bias: Tensor, shape: Shape) -> tuple[Tensor, Tensor, Tensor]:
        parts = _to_heads(qkv, shape, 3, bias)  # (3, B*H, N, hd) in the products' dtype
        scores = torch.bmm(parts[0], parts[1].transpose(1, 2))  # (B*H, N, N)
        weights = wide(scores).softmax(dim=-1)  # (B*H, N, N), float32 at least
        output = torch.bmm(weights.to(parts.dtype), parts[2])  # (B*H, N, hd)
        output = _to_rows(output.unsqueeze(0), shape)  # (M, D)
        ctx.save_for_backward(parts, weights)
        ctx.shape = shape
        return output, parts, weights

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor, grad_parts: Tensor, grad_weights: Tensor):
        parts, weights = ctx.saved_tensors
        with full_precision(parts):
            return _attention_backward(
                ctx.shape, parts, weights, grad_output, grad_parts, grad_weights
            )


def _baddbmm(bias: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """bias + a @ b (batched): one fused op where the dtypes agree, else the product in a's
    dtype (the products' one) added to the wider bias."""
    if bias.dtype == a.dtype:
        return torch.baddbmm(bias, a, b)
    return bias + torch.bmm(a, b)


def _attention_backward(shape: Shape, parts, weights, grad_output, grad_parts, grad_weights):
    """_Attention's backward: (dE/d(qkv rows) (M, 3D), dE/d(bias) (3D,), None); products in
    the dtype of parts (3, B*H, N, hd), the softmax backward in that of weights (B*H, N, N)."""
    q, k, v = parts  # (B*H, N, hd) each
    low = parts.dtype
    grad = _to_heads(grad_output.to(low), shape, 1)[0]  # (B*H, N, hd)
    grad_weights = _baddbmm(grad_weights, grad, v.transpose(1, 2))  # (B*H, N, N)
    scores = _softmax_backward(grad_weights, weights).to(low)  # (B*H, N, N)
    grad_parts, low_weights = grad_parts.to(low), weights.to(low)
    total = torch.empty_like(parts)  # (3, B*H, N, hd)
    torch.baddbmm(grad_parts[0], scores, k, out=total[0])
    torch.baddbmm(grad_parts[1], scores.transpose(1, 2), q, out=total[1])
    torch.baddbmm(grad_parts[2], low_weights.transpose(1, 2), grad, out=total[2])
    grad_qkv = _to_rows(total, shape)  # (M, 3D)
    return grad_qkv, wide(grad_qkv).sum(dim=0), None


class _AttentionGradient(torch.autograd.Function):
    """dE/d(qkv rows) (M, 3D) from dE/d(attention output rows) grad (M, D), given the output
    rows (M, D), q/k/v (3, B*H, N, hd) and weights (B*H, N, N) of _Attention; with its own
    derivative (the same batched matmuls as autograd's, far fewer elementwise passes)."""

    @staticmethod
    def forward(ctx, grad: Tensor, output: Tensor, parts: Tensor, weights: Tensor, shape: Shape):
        batch, patches, heads, width = shape
        q, k, v = parts  # (B*H, N, hd) each
        heads_grad = _to_heads(grad, shape, 1)[0]  # (B*H, N, hd)
        along = (wide(grad) * output).view(batch, patches, heads, width).sum(dim=-1)  # (B, N, H)
        along = along.transpose(1, 2).reshape(-1, patches, 1)  # (B*H, N, 1)
        heads_grad = heads_grad.to(parts.dtype)  # products in the dtype of parts
        centred = wide(torch.bmm(heads_grad, v.transpose(1, 2))).sub_(along)  # (B*H, N, N)
        scores = centred * weights  # (B*H, N, N), float32 at least
        total = torch.empty_like(parts)  # (3, B*H, N, hd)
        low_scores = scores.to(parts.dtype)
        torch.bmm(low_scores, k, out=total[0])
        torch.bmm(low_scores.transpose(1, 2), q, out=total[1])
        torch.bmm(weights.to(parts.dtype).transpose(1, 2), heads_grad, out=total[2])
        ctx.save_for_backward(grad, output, parts, weights, heads_grad, centred, scores)
        ctx.shape = shape
        return _to_rows(total, shape)  # (M, 3D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        with full_precision(grad_total):
            return _attention_gradient_backward(ctx.shape, saved, grad_total)


def _attention_gradient_backward(shape: Shape, saved: Saved, grad_total: Tensor):
    """_AttentionGradient's backward from dE/d(its output) grad_total (M, 3D); products in
    the dtype of parts, the rest in float32 at least."""
    grad, output, parts, weights, heads_grad, centred, scores = saved
    batch, patches, heads, width = shape
    low = parts.dtype
    q, k, v = parts  # (B*H, N, hd) each
    gq, gk, gv = _to_heads(grad_total.to(low), shape, 3)  # (B*H, N, hd) each
    grad_scores = wide(torch.baddbmm(torch.bmm(gq, k.transpose(1, 2)), q, gk.transpose(1, 2)))
    grad_parts = torch.empty_like(parts)  # (3, B*H, N, hd)
    low_scores, low_weights = scores.to(low), weights.to(low)
    torch.bmm(low_scores, gk, out=grad_parts[0])
    torch.bmm(low_scores.transpose(1, 2), gq, out=grad_parts[1])
    grad_weights = wide(torch.bmm(heads_grad, gv.transpose(1, 2))).addcmul_(grad_scores, centred)
    grad_centred = grad_scores.mul_(weights)  # (B*H, N, N)
    low_centred = grad_centred.to(low)
    grad_heads = torch.baddbmm(torch.bmm(low_weights, gv), low_centred, v)  # (B*H, N, hd)
    torch.bmm(low_centred.transpose(1, 2), heads_grad, out=grad_parts[2])
    along = grad_centred.sum(dim=-1).view(batch, heads, patches).transpose(1, 2)  # (B, N, H)
    along = along.neg().contiguous().unsqueeze(-1)  # (B, N, H, 1): -dE/d(along)
    grad_grad = _to_rows(grad_heads.unsqueeze(0), shape).view(batch, patches, heads, width)
    grad_grad = wide(grad_grad)  # (B, N, H, hd), float32 at least
    grad_output = grad.view(grad_grad.shape) * along  # (B, N, H, hd)
    grad_grad = grad_grad.addcmul_(output.view(grad_grad.shape), along)
    rows = grad.shape
    return grad_grad.view(rows), grad_output.view(rows), grad_parts, grad_weights, None
