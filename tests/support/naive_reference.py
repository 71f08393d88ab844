"""A deliberately naive float64 re-derivation of the paper's energy transformer.

Everything runs on ONE concatenated sequence, as the paper's code does:

    [step token (time_embed only)] + [x_0 .. x_{S-1}] + [e_0 .. e_{S-1}]

with ordinary softmax attention under one explicit (T, T) boolean mask:

- context row i (the step token counts as a context row) reads context keys 0..i;
- candidate j reads context keys 0..j+offset-1 (everything up to and including x_j, plus the step
  token) and itself, never another candidate (offset = 2 with a step token, else 1).

RoPE positions: context row i sits at i; candidate j at j + offset (its target's slot).

Step conditioning: time_embed prepends the landscape's embedding as the step token; adaln uses it
as a DiT condition for every block and for the final layer; pred_step adds it to the candidate
embeddings only; default ignores it.

Only parameters (`.weight` / `.bias` tensors) are read from the model under test; all the math
(RMSNorm, RoPE, SwiGLU, attention, adaLN) is written here with plain torch ops, in float64.
"""

from __future__ import annotations

import torch
from torch import nn

DOUBLE = torch.float64


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """x @ W^T (+ b), in float64."""
    out = x @ layer.weight.to(DOUBLE).T  # (..., out)
    if layer.bias is not None:
        out = out + layer.bias.to(DOUBLE)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    scale = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    return x * scale * weight.to(DOUBLE)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), written out."""
    return x / (1 + torch.exp(-x))


def swiglu(x: torch.Tensor, ffn: nn.Module) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x)."""
    return linear(silu(linear(x, ffn.w1)) * linear(x, ffn.w3), ffn.w2)


def rope_cos_sin(
    head_dim: int, positions: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (T, hd/2) of the RoPE angle position * theta^(-2i/hd), all in float64."""
    exponents = torch.arange(0, head_dim, 2, dtype=DOUBLE)[: head_dim // 2] / head_dim
    angles = positions.to(DOUBLE)[:, None] * theta ** (-exponents)[None, :]  # (T, hd/2)
    return torch.cos(angles), torch.sin(angles)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x0, x1), (x2, x3), ... of x (B, H, T, hd)."""
    even, odd = x[..., 0::2], x[..., 1::2]  # (B, H, T, hd/2) each
    rotated_even = even * cos - odd * sin
    rotated_odd = even * sin + odd * cos
    return torch.stack((rotated_even, rotated_odd), dim=-1).flatten(-2)  # (B, H, T, hd)


def masked_attention(
    x: torch.Tensor, attention: nn.Module, rope: tuple, mask: torch.Tensor
) -> torch.Tensor:
    """Multi-head softmax attention of x (B, T, D) under a boolean mask (T, T) (True = read)."""
    batch, length, dim = x.shape
    heads = attention.heads
    head_dim = dim // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, T, hd)

    q = rotate(split(linear(x, attention.wq)), *rope)
    k = rotate(split(linear(x, attention.wk)), *rope)
    v = split(linear(x, attention.wv))
    scores = q @ k.transpose(-1, -2) / head_dim**0.5  # (B, H, T, T)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    weights = weights / weights.sum(dim=-1, keepdim=True)  # (B, H, T, T)
    out = (weights @ v).transpose(1, 2).reshape(batch, length, dim)  # (B, T, D)
    return linear(out, attention.wo)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT adaLN: x * (1 + scale) + shift, with shift/scale (D,) shared by every position."""
    return x * (1 + scale) + shift


def block_forward(
    x: torch.Tensor, block: nn.Module, rope: tuple, mask: torch.Tensor, condition=None
) -> torch.Tensor:
    """Pre-norm llama block on x (B, T, D); DiT shift/scale/gate when a condition (D,) is given."""
    eps = block.attention_norm.eps
    attention_in = rms_norm(x, block.attention_norm.weight, eps)  # (B, T, D)
    if condition is None:
        h = x + masked_attention(attention_in, block.attention, rope, mask)
        return h + swiglu(rms_norm(h, block.ffn_norm.weight, eps), block.feed_forward)
    modulation = linear(silu(condition), block.modulation[1])  # (6D,)
    shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = modulation.chunk(6)
    attention_in = modulate(attention_in, shift_a, scale_a)
    attended = masked_attention(attention_in, block.attention, rope, mask)  # (B, T, D)
    h = x + gate_a * attended  # (B, T, D)
    ffn_in = modulate(rms_norm(h, block.ffn_norm.weight, eps), shift_f, scale_f)
    return h + gate_f * swiglu(ffn_in, block.feed_forward)


def layout(variant: str, length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(positions (T,), boolean mask (T, T), index of candidate 0) for S = length."""
    step_tokens = 1 if variant == "time_embed" else 0
    context = step_tokens + length  # context rows, the step token included
    offset = step_tokens + 1
    total = context + length
    mask = torch.zeros(total, total, dtype=torch.bool)
    for i in range(context):
        mask[i, : i + 1] = True  # causal over the context
    for j in range(length):
        row = context + j
        mask[row, : j + offset] = True  # context up to and including x_j (and the step token)
        mask[row, row] = True  # itself, no other candidate
    candidate_positions = torch.arange(length) + offset
    positions = torch.cat((torch.arange(context), candidate_positions))  # (T,)
    return positions, mask, context


def naive_energies(
    model: nn.Module, tokens: torch.Tensor, probabilities: torch.Tensor, landscape: int = 0
) -> torch.Tensor:
    """Energies (B, S) of candidate distributions (B, S, V) after context tokens (B, S)."""
    context = model.token_embedding.weight.to(DOUBLE)[tokens]  # (B, S, D)
    candidates = linear(probabilities.to(DOUBLE), model.candidate_projection)  # (B, S, D)
    return naive_energies_of_embeddings(model, context, candidates, landscape)


def naive_energies_of_embeddings(
    model: nn.Module, context: torch.Tensor, candidates: torch.Tensor, landscape: int = 0
) -> torch.Tensor:
    """Energies (B, S) of embedded candidates (B, S, D) after embedded context (B, S, D), both
    float64 (text: token rows and projected distributions; video: the frame embedding of both)."""
    variant = model.variant
    batch, length = context.shape[:2]
    step = None if model.step_embedding is None else model.step_embedding.weight[landscape]
    step = None if step is None else step.to(DOUBLE)  # (D,)
    if variant == "pred_step":
        candidates = candidates + step
    if variant == "time_embed":
        context = torch.cat((step.expand(batch, 1, -1), context), dim=1)  # (B, S + 1, D)
    x = torch.cat((context, candidates), dim=1)  # (B, T, D)
    positions, mask, first = layout(variant, length)
    head_dim = model.args.dim // model.args.heads
    rope = rope_cos_sin(head_dim, positions, model.args.rope_theta)
    condition = step if variant == "adaln" else None
    for block in model.blocks:
        x = block_forward(x, block, rope, mask, condition)
    z = rms_norm(x[:, first:], model.norm.weight, model.norm.eps)  # (B, S, D)
    if condition is not None:
        shift, scale = linear(silu(condition), model.final_modulation[1]).chunk(2)
        z = modulate(z, shift, scale)
    return linear(z, model.energy_head).squeeze(-1)  # (B, S)


def naive_step(
    model: nn.Module,
    tokens: torch.Tensor,
    state: torch.Tensor,
    landscape: int = 0,
    step_size: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One thinking step from logits state (B, S, V): (y' = p - alpha dE/dp, energies (B, S)).

    The gradient keeps its graph (create_graph=True), so a loss on y' has second-order terms.
    """
    alpha = model.step_size if step_size is None else step_size
    probabilities = torch.softmax(state.to(DOUBLE), dim=-1)  # (B, S, V)
    if not probabilities.requires_grad:  # a constant start: p itself is the variable
        probabilities.requires_grad_()
    energies = naive_energies(model, tokens, probabilities, landscape)  # (B, S)
    (gradient,) = torch.autograd.grad(energies.sum(), probabilities, create_graph=True)
    return probabilities - alpha.to(DOUBLE) * gradient, energies  # (B, S, V)


def naive_transformer_pp_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Transformer++ logits (B, S, V) with an explicit full (S, S) causal mask."""
    length = tokens.shape[1]
    x = model.token_embedding.weight.to(DOUBLE)[tokens]  # (B, S, D)
    mask = torch.ones(length, length, dtype=torch.bool).tril()  # (S, S)
    head_dim = model.args.dim // model.args.heads
    rope = rope_cos_sin(head_dim, torch.arange(length), model.args.rope_theta)
    for block in model.blocks:
        x = block_forward(x, block, rope, mask)
    return linear(rms_norm(x, model.norm.weight, model.norm.eps), model.output)  # (B, S, V)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, S, V) against targets (B, S), from log-sum-exp."""
    log_z = torch.logsumexp(logits, dim=-1)  # (B, S)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, S)
    return (log_z - picked).mean()
