"""Text generation for both model kinds: the EBT thinks only about the newest position.

This first version re-encodes the (windowed) prefix for every new token; the EBT optimises a
single candidate against it, so a token costs one context pass plus the thinking steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ebt.api import LoadedRun
from ebt.models import EnergyTransformer


def next_token_logits(
    run: LoadedRun, tokens: torch.Tensor, steps: int | None = None
) -> torch.Tensor:
    """Logits (B, V) for the token after tokens (B, T)."""
    model = run.model
    if isinstance(model, EnergyTransformer):
        last = torch.tensor([tokens.shape[1] - 1], device=tokens.device)
        trajectory = model.think(tokens, steps=steps, rows=last)
        return trajectory.states[-1][:, -1]
    with torch.no_grad():
        return model(tokens)[:, -1]


def sample(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """Greedy when temperature is 0, else a draw from the top-k tempered distribution."""
    logits = logits.float().reshape(-1)
    if temperature <= 0:
        return int(logits.argmax())
    if top_k > 0:
        threshold = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probabilities = (logits / temperature).softmax(-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def generate(
    run: LoadedRun,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    steps: int | None = None,
) -> Iterator[str]:
    """Yield text pieces as tokens are produced (prompt excluded)."""
    tokenizer, window = run.tokenizer, run.config.data.seq_len
    ids = tokenizer.encode(prompt) or [tokenizer.pad_id]
    device = next(run.model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    new: list[int] = []
    shown = ""
    for _ in range(max_new_tokens):
        tokens = torch.tensor([ids[-window:]], device=device)  # (1, T)
        token = sample(next_token_logits(run, tokens, steps).cpu(), temperature, top_k, generator)
        ids.append(token)
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
            yield text[len(shown) :]
            shown = text
