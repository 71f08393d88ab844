"""evaluate(): every metric is a mean over the split weighted by what each batch holds (its
rows here, tokens or images or frames for real tasks), so a short last batch counts by its size.
The distributed sum over ranks is checked in test_distributed.py (it needs two processes)."""

from __future__ import annotations

import pytest
import torch
from support.distributed import RowMeans, row_batches

from ebt.training.evaluate import evaluate

CPU = torch.device("cpu")


def test_evaluate_weights_each_batch_by_its_size():
    """Batches of 4, 4 and a short last 1: the means are over all 9 rows (float64 sums: 1e-12),
    not the mean of the 3 batch means (which the short batch's single large value would drag)."""
    batches = row_batches([4, 4, 1])
    rows = torch.cat(batches)  # (9,)
    result = evaluate(RowMeans(), batches, CPU)
    assert result["rows"] == 9
    assert result["loss"] == pytest.approx(rows.mean().item(), rel=1e-12)
    assert result["loss_per_step"] == pytest.approx([rows.mean().item()], rel=1e-12)
    assert result["square"] == pytest.approx(rows.square().mean().item(), rel=1e-12)
    assert result["forward_passes"] == pytest.approx(1.0, rel=1e-12)
    unweighted = torch.stack([batch.mean() for batch in batches]).mean().item()
    assert abs(unweighted - result["loss"]) > 1  # the check can tell the two apart


def test_evaluate_leaves_the_objective_in_its_mode_and_refuses_an_empty_split():
    objective = RowMeans().train()
    evaluate(objective, row_batches([2]), CPU)
    assert objective.training
    with pytest.raises(ValueError, match="no targets"):
        evaluate(objective, [], CPU)
