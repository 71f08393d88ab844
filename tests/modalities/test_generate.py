"""Cached generation (KV cache, newest position only) equals recomputing everything."""

from __future__ import annotations

import pytest
import torch
from support.text import written_out_calls

from ebt.config import load_config
from ebt.modalities.text.generate import Sampling, generate_ids, sample, visible_length
from ebt.models import build_model
from ebt.nn.kv_cache import KeyValueBuffer
from ebt.thinking.loop import InferenceOptions

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


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_cached_generation_equals_recompute_everything_past_the_window(kind, variant):
    """Window 8, 3 prompt + 20 new tokens (the window restarts three times): the cache rebuilt
    on restarts and extended in between gives recompute-everything's tokens, one for one."""
    model = _model(kind, variant, window=8)
    cached = list(generate_ids(model, [1, 2, 3], 20, window=8, cached=True))
    naive = list(generate_ids(model, [1, 2, 3], 20, window=8, cached=False))
    assert cached == naive


def test_the_window_past_its_end_restarts_from_the_newest_half():
    """visible_length: everything within the window, then 4, 5, ..., 8 newest tokens for
    window 8 (restarting every 5 tokens); odd and 1-token windows never read nothing."""
    assert [visible_length(total, 8) for total in range(1, 20)] == [
        *range(1, 9), 4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 4
    ]  # fmt: skip
    assert [visible_length(total, 5) for total in range(5, 13)] == [5, 2, 3, 4, 5, 2, 3, 4]
    assert [visible_length(total, 1) for total in range(1, 5)] == [1, 1, 1, 1]


def test_recompute_past_the_window_reads_exactly_the_visible_window(monkeypatch):
    """Each token's logits come from the newest visible_length tokens, no more, no fewer (the
    recompute path's input, recorded at the Transformer++ forward; the cached path equals it)."""
    model = _model("transformer_pp", "time_embed", window=8)
    seen, forward = [], model.forward

    def recording(tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens[0].tolist())  # (1, T) -> T ids
        return forward(tokens)

    monkeypatch.setattr(model, "forward", recording)
    ids = [1, 2, 3] + list(generate_ids(model, [1, 2, 3], 12, window=8, cached=False))
    expected = [ids[total - visible_length(total, 8) : total] for total in range(3, 15)]
    assert seen == expected


def test_extend_context_equals_encoding_the_whole_prefix():
    """Appending tokens to a context cache equals encoding the concatenation."""
    model = _model("ebt", "time_embed").double()
    tokens = torch.randint(1, 20, (2, 12))
    full = model.encode_context(tokens, 1)
    cache = model.extend_context(model.encode_context(tokens[:, :5], 1), tokens[:, 5:9])
    cache = model.extend_context(cache, tokens[:, 9:])
    for ours, reference in zip(cache.keys + cache.values, full.keys + full.values, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["time_embed", "adaln", "pred_step"])
def test_one_token_extensions_equal_encoding_the_whole_prefix(variant, monkeypatch):
    """Generation's one-token path (hand-written, in place; it ran) equals encoding the prefix."""
    model = _model("ebt", variant).double()
    tokens = torch.randint(1, 20, (2, 9))
    cache = model.encode_context(tokens[:, :3], 1, capacity=6)  # grows past its capacity
    calls = written_out_calls(monkeypatch, "extend_context_by_one")
    for position in range(3, 9):
        cache = model.extend_context(cache, tokens[:, position : position + 1])
    assert calls == ["inference"] * 6
    full = model.encode_context(tokens, 1)
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


def test_key_value_buffer_grows_in_place_and_keeps_old_views():
    """Appends write after the filled positions (growing past capacity); earlier views stay."""
    keys, values = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    buffer = KeyValueBuffer(keys, values, capacity=4)
    old_keys, _ = buffer.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    new = torch.randn(1, 2, 5, 4)
    all_keys, all_values = buffer.append(new, new + 1)  # beyond the capacity: grows
    assert all_keys.shape == (1, 2, 9, 4) and buffer.length == 9
    torch.testing.assert_close(all_keys[:, :, :4], old_keys, rtol=0, atol=0)
    torch.testing.assert_close(all_keys[:, :, :3], keys, rtol=0, atol=0)
    torch.testing.assert_close(all_values[:, :, 4:], new + 1, rtol=0, atol=0)


def test_extending_an_older_cache_forks_instead_of_overwriting():
    """Two continuations of one prefix each equal encoding their own full sequence."""
    model = _model("ebt", "time_embed").double()
    tokens = torch.randint(1, 20, (1, 9))
    prefix = model.encode_context(tokens[:, :5], 1, capacity=16)
    first = model.extend_context(prefix, tokens[:, 5:7])
    second = model.extend_context(prefix, tokens[:, 7:9])  # a fork of the older view
    for cache, tail in ((first, tokens[:, 5:7]), (second, tokens[:, 7:9])):
        full = model.encode_context(torch.cat((tokens[:, :5], tail), dim=1), 1)
        for ours, reference in zip(cache.keys, full.keys, strict=True):
            torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["time_embed", "adaln"])
def test_stacked_landscape_cache_equals_one_cache_per_landscape(variant):
    """One pass over a landscape-per-row stack (how generation extends every landscape at
    once) equals encoding each landscape on its own, keys, values and energies."""
    model = _model("ebt", variant).double()
    tokens, tail = torch.randint(1, 20, (1, 7)), torch.randint(1, 20, (1, 3))
    stacked = model.encode_context(tokens.expand(2, -1), torch.tensor([0, 1]), capacity=8)
    stacked = model.extend_context(stacked, tail.expand(2, -1))
    probabilities = torch.randn(1, 10, 20, dtype=torch.float64).softmax(-1)
    for landscape in (0, 1):
        ours = stacked.select(slice(landscape, landscape + 1), landscape)
        alone = model.encode_context(torch.cat((tokens, tail), dim=1), landscape)
        for mine, reference in zip(ours.keys + ours.values, alone.keys + alone.values, strict=True):
            torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            model.energies(ours, probabilities), model.energies(alone, probabilities)
        )


def test_generation_with_halting_tolerance_zero_equals_fixed_steps():
    """Adaptive halting in generation: tolerance 0 never halts (same tokens, every step taken);
    a large tolerance stops tokens early."""
    model, prompt = _model("ebt", "time_embed"), [3, 4, 5, 6]
    thinking = InferenceOptions(langevin_noise=0.0)
    fixed, halted, loose = [], [], []
    plain = Sampling(steps=3, thinking=thinking)
    tokens = list(generate_ids(model, prompt, 6, 16, plain, records=fixed))
    zero = Sampling(steps=3, thinking=thinking, halt_tolerance=0.0)
    assert list(generate_ids(model, prompt, 6, 16, zero, records=halted)) == tokens
    assert [r["steps"] for r in halted] == [r["steps"] for r in fixed] == [6] * 6
    large = Sampling(steps=3, thinking=thinking, halt_tolerance=1e9)
    list(generate_ids(model, prompt, 6, 16, large, records=loose))
    assert all(r["steps"] < 6 for r in loose)
