"""The image energy and its gradient dE/dx with respect to the image, written out by hand.

The image counterpart of candidate_gradient.py. Asking autograd for dE/dx with `create_graph`
and differentiating that again (a double backward) runs the second derivatives of every
LayerNorm, GELU-tanh, softmax and adaLN modulation as many small kernels. Here the energy's
forward and its vector-Jacobian product dE/dx are written out:

- inference (first order): run under inference_mode, nothing is recorded;
- training (second order): run with grad enabled, autograd records the pass, and the loss's
  backward differentiates the written-out gradient once (a first-order graph).

The adaLN modulations are folded into the weights they feed: LN(x) (1 + c) + s followed by a
Linear W is LN(x) followed by W (1 + c) with bias b + W s, and a gate g on a Linear's output is
the Linear with rows scaled by g. The forward and the backward then use the same folded
weights, and the LayerNorm backward's centring of its incoming gradient is folded into a
centred copy of the weight that produces it. Matmuls, the folds and the heads are ordinary ops
that autograd differentiates; the elementwise-heavy pieces (LayerNorm with 1/std, the
LayerNorm backward, GELU-tanh with its derivative, attention and its backward) are
autograd.Functions whose own derivative is written out too: the same math in fewer memory
passes (CPU steps here are bound by memory traffic outside the matmuls). Those derivatives
are first order (`once_differentiable`): the training graph is differentiated once, as it is.
The attention's two Functions live in image_attention.py.
Tests check energies, dE/dx and the training gradients against autograd in float64.

Under bf16 (or fp16) autocast the matrix products run in the autocast dtype; LayerNorm
statistics, softmax, GELU-tanh and its derivatives, the attention's row sums, the residual
streams, the adaLN folds and the energy head run in float32, with explicit dtypes (see
`ebt.nn.precision`): the autograd.Functions cast their bmm operands themselves and run their
backward with autocast off, so the pass computes the same on CPU and CUDA and whatever autocast
state the backward runs in. Outside autocast nothing changes, bit for bit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ebt.models.image_attention import Saved, Shape, _Attention, _AttentionGradient
from ebt.nn.dit import NORM_EPS, DiTBlock, patch_grid
from ebt.nn.precision import full_precision, wide

if TYPE_CHECKING:
    from ebt.models.image_energy import ImageEnergyTransformer

GELU_SCALE = math.sqrt(2.0 / math.pi)  # GELU-tanh: 0.5 u (1 + tanh(GELU_SCALE (u + c u^3)))
GELU_CUBIC = 0.044715


class Folded(NamedTuple):
    """One block's weights with its modulation folded in (see the module docstring)."""

    qkv: torch.Tensor  # (3D, D): columns scaled by 1 + scale1, query rows by 1/sqrt(hd)
    qkv_bias: torch.Tensor  # (3D,): query part scaled by 1/sqrt(hd); added by _Attention
    qkv_centred: torch.Tensor  # (3D, D): qkv, each row minus its mean (for the LN backward)
    out: torch.Tensor  # (D, D): rows scaled by gate1
    out_bias: torch.Tensor  # (D,)
    fc1: torch.Tensor  # (F, D): columns scaled by 1 + scale2
    fc1_bias: torch.Tensor  # (F,)
    fc1_centred: torch.Tensor  # (F, D)
    fc2: torch.Tensor  # (D, F): rows scaled by gate2
    fc2_bias: torch.Tensor  # (D,)


def _centred(weight: torch.Tensor) -> torch.Tensor:
    """weight (out, D) minus each row's mean: g @ result is g @ weight centred over D."""
    return weight - weight.mean(dim=1, keepdim=True)  # (out, D)


def _fold(block: DiTBlock, condition: torch.Tensor) -> Folded:
    """The block's weights with its six adaLN vectors (from condition (1, D)) folded in, and
    the attention scale 1/sqrt(hd) folded into the query rows (so that the attention's layout
    passes are plain copies)."""
    mod = wide(block.modulation(condition))[0].chunk(6)  # 6 x (D,), float32 at least
    shift1, scale1, gate1, shift2, scale2, gate2 = mod
    attention, mlp = block.attention, block.feed_forward
    queries = _query_scale(attention.qkv.weight, block.attention.heads)  # (3D, 1)
    qkv = attention.qkv.weight * (1 + scale1) * queries  # (3D, D)
    with full_precision(condition):  # the folded biases in float32 at least
        qkv_bias = torch.addmv(attention.qkv.bias, attention.qkv.weight, shift1) * queries[:, 0]
        fc1_bias = torch.addmv(mlp.fc1.bias, mlp.fc1.weight, shift2)  # (F,)
    fc1 = mlp.fc1.weight * (1 + scale2)  # (F, D)
    out = attention.out.weight * gate1.unsqueeze(1)  # (D, D)
    fc2 = mlp.fc2.weight * gate2.unsqueeze(1)  # (D, F)
    return Folded(
        qkv, qkv_bias, _centred(qkv), out, attention.out.bias * gate1,
        fc1, fc1_bias, _centred(fc1), fc2, mlp.fc2.bias * gate2,
    )  # fmt: skip


class _LayerNorm(torch.autograd.Function):
    """LayerNorm without affine of rows x (M, D) that also returns 1 / std (M, 1), with the
    derivative of both outputs (one fused kernel each way, where composing the normalisation
    and 1 / std from ordinary ops costs about a dozen kernels)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normalised, mean, inverse = torch.native_layer_norm(x, x.shape[-1:], None, None, NORM_EPS)
        ctx.save_for_backward(x, mean, inverse, normalised)
        return normalised, inverse  # (M, D), (M, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_normalised: torch.Tensor, grad_inverse: torch.Tensor) -> torch.Tensor:
        x, mean, inverse, normalised = ctx.saved_tensors
        grad_normalised, grad_inverse = wide(grad_normalised), wide(grad_inverse)
        grad = torch.ops.aten.native_layer_norm_backward(
            grad_normalised, x, x.shape[-1:], mean, inverse, None, None, [True, False, False]
        )[0]  # (M, D)
        # d(1 / std)/dx = -(1 / std)^3 (x - mean) / D = -(1 / std)^2 / D * normalised
        along = grad_inverse * inverse.square() * (-1.0 / x.shape[-1])  # (M, 1)
        return torch.addcmul(grad, normalised, along)  # (M, D)


def _norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm without affine of rows x (M, D): (normalised (M, D), 1 / std (M, 1)), in
    float32 at least."""
    return _LayerNorm.apply(wide(x))


class _NormBackward(torch.autograd.Function):
    """residual + the LayerNorm backward of a gradient already centred over D, on rows (M, D):
    residual + inverse (centred - normalised a), a = (centred . normalised) / D, with its own
    derivative (eight kernels where autograd's formulas for the same ops take about twelve)."""

    @staticmethod
    def forward(ctx, residual: Tensor, centred: Tensor, normalised: Tensor, inverse: Tensor):
        along = (centred * normalised).sum(dim=-1, keepdim=True) / centred.shape[-1]  # (M, 1)
        projected = torch.addcmul(centred, normalised, along, value=-1.0)  # (M, D)
        ctx.save_for_backward(centred, normalised, inverse, along, projected)
        return torch.addcmul(residual, projected, inverse)  # (M, D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, ...]:
        centred, normalised, inverse, along, projected = ctx.saved_tensors
        scaled = grad * inverse  # (M, D)
        grad_inverse = (grad * projected).sum(dim=-1, keepdim=True)  # (M, 1)
        back = (scaled * normalised).sum(dim=-1, keepdim=True) / grad.shape[-1]  # (M, 1)
        grad_centred = torch.addcmul(scaled, normalised, back, value=-1.0)  # (M, D)
        grad_normalised = torch.addcmul(scaled * -along, centred, back, value=-1.0)  # (M, D)
        return grad, grad_centred, grad_normalised, grad_inverse


def _norm_backward(
    residual: Tensor, centred: Tensor, normalised: Tensor, inverse: Tensor
) -> Tensor:
    """residual (M, D) + the LayerNorm backward of a gradient already centred over D (M, D),
    in float32 at least."""
    return _NormBackward.apply(wide(residual), wide(centred), normalised, inverse)


class _Gelu(torch.autograd.Function):
    """(GELU-tanh of u (M, F), its derivative at u (M, F)), with the derivative of both.

    With z = s (u + c u^3), z' = s (1 + 3 c u^2) and tanh(z) = 2 r - 1, r = sigmoid(2 z) (one
    sigmoid: a third of tanh's cost here), w = r (1 - r):
    GELU = u r, GELU' = r + u w (2 z') and GELU'' = w (4 (2 z') - 4 s - u (2 r - 1) (2 z')^2).
    Written as one function so that neither direction records a dozen elementwise kernels.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.tensor(2 * GELU_SCALE, dtype=u.dtype, device=u.device)  # () broadcast
        ratio = torch.addcmul(scale, u, u, value=2 * GELU_SCALE * GELU_CUBIC).mul_(u).sigmoid_()
        slope = torch.addcmul(scale, u, u, value=6 * GELU_SCALE * GELU_CUBIC)  # (M, F): 2 z'
        spread = torch.addcmul(ratio, ratio, ratio, value=-1.0)  # (M, F): w
        derivative = torch.addcmul(ratio, u * spread, slope)  # (M, F)
        ctx.save_for_backward(u, ratio, slope, spread, derivative)
        return u * ratio, derivative  # (M, F) each

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hidden: Tensor, grad_derivative: Tensor) -> Tensor:
        u, ratio, slope, spread, derivative = ctx.saved_tensors  # (M, F) each
        second = (2 * ratio).sub_(1.0).mul_(u).mul_(slope).mul_(slope)  # (M, F): u t (2 z')^2
        second = second.neg_().add_(slope, alpha=4.0).sub_(4 * GELU_SCALE).mul_(spread)  # GELU''
        return torch.addcmul(grad_hidden * derivative, second, grad_derivative)  # (M, F)


def _gelu(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GELU-tanh of u (M, F), its derivative at u (M, F)), in float32 at least (its second
    derivative cancels terms)."""
    return _Gelu.apply(wide(u))


def _query_scale(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """(3D, 1): 1/sqrt(hd) for the query rows of a qkv weight (3D, D), 1 for the others."""
    dim = qkv.shape[1]
    scale = qkv.new_ones(3 * dim, 1)
    scale[:dim] = (dim // heads) ** -0.5
    return scale


def _block_forward(x: torch.Tensor, weights: Folded, shape: Shape) -> tuple[torch.Tensor, Saved]:
    """A DiT block on rows x (M, D), keeping what the backward needs."""
    normalised, inverse = _norm(x)  # (M, D), (M, 1)
    qkv = torch.mm(normalised, weights.qkv.t())  # (M, 3D): the bias is added by _Attention
    output, parts, attention_weights = _Attention.apply(qkv, weights.qkv_bias, shape)
    h = torch.addmm(weights.out_bias, output, weights.out.t()) + x  # (M, D)
    normalised_h, inverse_h = _norm(h)  # (M, D), (M, 1)
    hidden, slope = _gelu(torch.addmm(weights.fc1_bias, normalised_h, weights.fc1.t()))
    out = torch.addmm(weights.fc2_bias, hidden, weights.fc2.t()) + h  # (M, D)
    saved = (normalised, inverse, output, parts, attention_weights, normalised_h, inverse_h)
    return out, saved + (slope,)


def _block_backward(grad: Tensor, weights: Folded, saved: Saved, shape: Shape) -> Tensor:
    """dE/dx (M, D) of the block's input from dE/d(output) (M, D)."""
    normalised, inverse, output, parts, attention_weights, normalised_h, inverse_h, slope = saved
    grad_u = torch.mm(grad, weights.fc2) * slope  # (M, F)
    grad_h = _norm_backward(grad, torch.mm(grad_u, weights.fc1_centred), normalised_h, inverse_h)
    grad_output = torch.mm(grad_h, weights.out)  # (M, D)
    grad_qkv = _AttentionGradient.apply(grad_output, output, parts, attention_weights, shape)
    return _norm_backward(grad_h, torch.mm(grad_qkv, weights.qkv_centred), normalised, inverse)


def _patch_rows(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Images (B, C, H, W) -> patch rows (B*N, C*p*p) in the Conv2d weight's (c, p, q) order."""
    batch, channels, height, width = images.shape
    rows, columns = patch_grid(height, width, patch)
    x = images.reshape(batch, channels, rows, patch, columns, patch)  # (B, C, h, p, w, q)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(batch * rows * columns, -1)  # (M, C*p*p)


def _patch_images(rows: torch.Tensor, shape: tuple[int, ...], patch: int) -> torch.Tensor:
    """Patch rows (B*N, C*p*p) -> images (B, C, H, W) of `shape`; inverse of _patch_rows."""
    batch, channels, height, width = shape
    x = rows.view(batch, height // patch, width // patch, channels, patch, patch)  # (B,h,w,C,p,q)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(shape)  # (B, C, H, W)


def _embed(model: ImageEnergyTransformer, images: torch.Tensor) -> torch.Tensor:
    """The patch embedding (Conv2d as a Linear on patch rows) plus positions: rows (M, D)."""
    embedding = model.patch_embedding
    patch, batch = embedding.patch, images.shape[0]
    weight = embedding.projection.weight.flatten(1)  # (D, C*p*p)
    positions = embedding.position_table(*patch_grid(*images.shape[2:], patch))  # (N, D)
    tokens = torch.mm(_patch_rows(images, patch), weight.t()).view(batch, -1, weight.shape[0])
    return (tokens + (positions + embedding.projection.bias)).flatten(0, 1)  # (M, D)


def _energy_head(
    model: ImageEnergyTransformer, x: Tensor, condition: Tensor, patches: int
) -> tuple[Tensor, Tensor]:
    """(energies (B,), dE/dx (M, D)) of the last block's output rows x (M, D)."""
    head = model.energy_head
    shift, scale = wide(head.modulation(condition))[0].chunk(2)  # (D,) each
    weight = head.linear.weight[0]  # (D,): the head has one output and no bias
    folded = weight * (1 + scale)  # (D,)
    normalised, inverse = _norm(x)  # (M, D), (M, 1)
    with full_precision(x):  # the energies in float32 at least, also under autocast
        scores = torch.mv(normalised, folded).view(-1, patches)  # (B, N): patch energies - w.s
        energies = scores.mean(dim=1) + torch.dot(weight, shift)  # (B,)
    centred = (folded - folded.mean()) / patches  # (D,): dE/d(normalised), centred
    along = scores.view(-1, 1) / (patches * x.shape[-1])  # (M, 1)
    projected = torch.addcmul(centred, normalised, along, value=-1.0)  # (M, D)
    return energies, projected * inverse  # (B,), (M, D)


def energies_and_gradient(
    model: ImageEnergyTransformer, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(energies (B,), dE/dx (B, C, H, W)) of candidate images (B, C, H, W): the model's
    forward and its input gradient, differentiable (once) when run with grad enabled."""
    batch, _, height, width = images.shape
    args, patch = model.args, model.patch_embedding.patch
    patches = math.prod(patch_grid(height, width, patch))
    shape = (batch, patches, args.heads, args.dim // args.heads)
    condition = model.condition.weight  # (1, D)
    folded = [_fold(block, condition) for block in model.blocks]
    x = _embed(model, images)  # (M, D)
    saved = []
    for weights in folded:
        x, kept = _block_forward(x, weights, shape)
        saved.append(kept)
    energies, grad = _energy_head(model, x, condition, patches)  # (B,), (M, D)
    for weights, kept in zip(reversed(folded), reversed(saved), strict=True):
        grad = _block_backward(grad, weights, kept, shape)
    projection = model.patch_embedding.projection.weight.flatten(1)  # (D, C*p*p)
    gradient = torch.mm(grad, projection).to(images.dtype)  # (M, C*p*p)
    return energies, _patch_images(gradient, images.shape, patch)
