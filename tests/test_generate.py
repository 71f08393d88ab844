"""Cached generation (KV cache, newest position only) equals recomputing everything."""

from __future__ import annotations

import pytest
import torch

from ebt.config import load_config
from ebt.generate import Sampling, generate_ids, sample
from ebt.models import build_model

CASES = [("ebt", v) for v in ("time_embed", "adaln", "default", "pred_step")]
CASES.append(("transformer_pp", "time_embed"))


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(kind: str, variant: str, window: int = 16) -> torch.nn.Module:
    overrides = [f"model.kind={kind}", f"model.variant={variant}", "model.dim=32"]
    overrides += ["model.layers=2", "model.heads=2", f"data.seq_len={window}"]
    torch.manual_seed(0)
    return build_model(load_config(None, overrides), 20).eval()


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_cached_generation_equals_recompute_everything(kind, variant):
    """Greedy, same starting noise: token for token identical inside the window."""
    model, prompt = _model(kind, variant), [3, 4, 5, 6]
    cached = list(generate_ids(model, prompt, 12, window=16, cached=True))
    naive = list(generate_ids(model, prompt, 12, window=16, cached=False))
    assert cached == naive


@pytest.mark.parametrize(("kind", "variant"), CASES[:1] + CASES[-1:])
def test_generation_slides_past_the_window(kind, variant):
    """Longer than the context window: the cache is rebuilt and generation goes on."""
    tokens = list(generate_ids(_model(kind, variant, window=8), [1, 2, 3], 20, window=8))
    assert len(tokens) == 20 and all(0 <= t < 20 for t in tokens)


def test_extend_context_equals_encoding_the_whole_prefix():
    """Appending tokens to a context cache equals encoding the concatenation."""
    model = _model("ebt", "time_embed").double()
    tokens = torch.randint(1, 20, (2, 12))
    full = model.encode_context(tokens, 1)
    cache = model.extend_context(model.encode_context(tokens[:, :5], 1), tokens[:, 5:9])
    cache = model.extend_context(cache, tokens[:, 9:])
    for ours, reference in zip(cache.keys + cache.values, full.keys + full.values, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_sampling_greedy_top_k_top_p():
    """Temperature 0 is argmax; top-k / top-p never pick outside the allowed set."""
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    generator = torch.Generator().manual_seed(0)
    assert sample(logits, Sampling(), generator) == 1
    picks = {sample(logits, Sampling(temperature=1.0, top_k=2), generator) for _ in range(50)}
    assert picks <= {1, 3}
    nucleus = {sample(logits, Sampling(temperature=1.0, top_p=0.5), generator) for _ in range(50)}
    assert nucleus <= {1, 3}
