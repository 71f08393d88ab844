"""Inference-time thinking: best-of-N by energy, thinking curves, uncertainty metrics."""

from __future__ import annotations

import pytest
import torch

from ebt.config import load_config
from ebt.models import build_model
from ebt.thinking.halting import adaptive_think
from ebt.thinking.selection import auroc, best_of_n, thinking_curves

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(kind: str = "ebt", variant: str = "time_embed") -> torch.nn.Module:
    overrides = [f"model.kind={kind}", f"model.variant={variant}", "model.dim=32"]
    overrides += ["model.layers=2", "model.heads=2", "data.seq_len=12", "think.step_size=20"]
    torch.manual_seed(0)
    return build_model(load_config(None, overrides), 20).eval()


@pytest.mark.parametrize("variant", ["time_embed", "pred_step"])
def test_best_of_one_equals_plain_thinking(variant):
    """One sample from the same start is exactly model.think's last state."""
    model, tokens = _model(variant=variant), torch.randint(1, 20, (2, 10))
    torch.manual_seed(1)
    verdict = best_of_n(model, tokens, steps=2, samples=1)
    torch.manual_seed(1)
    init = torch.randn(2, 10, 20)
    plain = model.think(tokens, init, steps=2).states[-1]
    torch.testing.assert_close(verdict.logits, plain)


def test_best_of_n_keeps_the_lowest_final_energy_per_token():
    """Each position gets the candidate whose own final energy is lowest among the N."""
    model, tokens = _model(), torch.randint(1, 20, (2, 10))
    torch.manual_seed(2)
    verdict = best_of_n(model, tokens, steps=1, samples=4)
    torch.manual_seed(2)
    init = torch.randn(2, 40, 20)
    rows = torch.arange(10).repeat(4)
    final = model.think(tokens, init, steps=1, rows=rows).states[-1]  # (B, 4 * S, V)
    cache = model.encode_context(tokens, 1)
    with torch.no_grad():
        energies = model.energies(cache, final.softmax(-1), rows).view(2, 4, 10)
    torch.testing.assert_close(verdict.energies, energies.min(dim=1).values)
    chosen = final.view(2, 4, 10, 20)[
        torch.arange(2)[:, None], energies.argmin(1), torch.arange(10)
    ]
    torch.testing.assert_close(verdict.logits, chosen)
    assert verdict.forward_passes_per_token == 2 * 4 + 4  # 2 landscapes x 1 step, + final


def test_transformer_pp_curves_are_flat():
    """Thinking does not exist for the baseline: every (steps, samples) point is the same."""
    batches = [torch.randint(1, 20, (2, 11))]
    result = thinking_curves(_model("transformer_pp"), batches, [1, 4], [1, 2])
    losses = {round(point["loss"], 6) for point in result["curves"]}
    assert len(losses) == 1 and "uncertainty" not in result
    tokens = result["tokens"]  # per-token loss and mistakes still there (for --tokens)
    assert tokens["energy"] is None and len(tokens["loss"]) == len(tokens["wrong"]) == 20


def test_ebt_curves_report_compute_and_uncertainty():
    batches = [torch.randint(1, 20, (2, 11))]
    result = thinking_curves(_model(), batches, [1, 2], [1, 2])
    assert [(p["steps"], p["samples"]) for p in result["curves"]] == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
    ]
    passes = [p["forward_passes_per_token"] for p in result["curves"]]
    assert passes == [2.0, 6.0, 4.0, 10.0]
    assert 0.0 <= result["uncertainty"]["energy_auroc_wrong"] <= 1.0


def test_auroc():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    assert auroc(scores, torch.tensor([False, False, True, True])) == pytest.approx(0.75)
    assert auroc(scores, torch.tensor([False, False, False, True])) == pytest.approx(1.0)


def test_rank_auroc_equals_the_pairwise_definition_with_ties():
    """P(positive > negative) + P(tie) / 2, counted over all pairs."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (500,), generator=generator).double()  # many ties
    positives = torch.rand(500, generator=generator) < 0.3
    positive, negative = scores[positives], scores[~positives]
    greater = (positive[:, None] > negative[None, :]).double().mean()
    ties = (positive[:, None] == negative[None, :]).double().mean()
    assert auroc(scores, positives) == pytest.approx(float(greater + ties / 2), abs=1e-12)


@pytest.mark.parametrize("variant", ["time_embed", "pred_step", "adaln"])
def test_halting_with_zero_tolerance_equals_fixed_steps(variant):
    """Tolerance 0 never halts: the adaptive (gathered) path equals plain thinking."""
    model, tokens = _model(variant=variant).double(), torch.randint(1, 20, (2, 10))
    init = torch.randn(2, 10, 20, dtype=torch.float64)
    dense = model.think(tokens, init, steps=3, langevin_noise=0).states[-1]
    result = adaptive_think(model, tokens, 3, tolerance=0.0, init=init)
    assert (result.steps == 6).all() and result.forward_passes_per_token == 6.0
    torch.testing.assert_close(result.logits, dense, rtol=1e-10, atol=1e-10)


def test_gathered_positions_that_keep_thinking_equal_the_dense_path():
    """Positions that never halt get exactly the dense result; halted ones stop early."""
    model, tokens = _model(variant="time_embed").double(), torch.randint(1, 20, (3, 10))
    init = torch.randn(3, 10, 20, dtype=torch.float64)
    dense = model.think(tokens, init, steps=3, langevin_noise=0).states[-1]
    result = adaptive_think(model, tokens, 3, tolerance=0.02, init=init)
    kept = result.steps == 6
    assert kept.any() and (~kept).any(), "tolerance should halt some positions, not all"
    torch.testing.assert_close(result.logits[kept], dense[kept], rtol=1e-10, atol=1e-10)
    assert result.forward_passes_per_token < 6.0
