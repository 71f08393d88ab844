"""Our model reproduces the paper's code on its own checkpoints (../shared/vectors).

The paper's outputs were computed in float32. Our model runs them in float64 (our exact math
against their float32 result: within 1e-4, observed <= 4.3e-5) and in float32 (both sides
rounded; the second time_embed step amplifies the first step's float32 rounding about 170-fold,
so the float32 bound depends on the CPU's summation order: observed up to 1.5e-4 on AMD EPYC).
"""

from __future__ import annotations

import pytest
import torch
from support.tolerances import relative

from ebt.interop.reference import config_from_hparams, convert_state_dict, our_key
from ebt.models import build_model
from ebt.objective import Objective

EBT_VARIANTS = ["ebt_time_embed", "ebt_default", "ebt_adaln"]
TOLERANCE = {torch.float64: 1e-4, torch.float32: 5e-4}  # relative to the largest magnitude
DTYPES = pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["float64", "float32"])


def _load(vectors_dir, name, dtype=torch.float32):
    checkpoint = torch.load(vectors_dir / name / "ref.ckpt", weights_only=True)
    expected = torch.load(vectors_dir / name / "expected.pt", weights_only=True)
    state = convert_state_dict(checkpoint["state_dict"])
    config = config_from_hparams(checkpoint["hyper_parameters"], checkpoint["state_dict"])
    model = build_model(config, state["token_embedding.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    return model.to(dtype), config, expected


@DTYPES
@pytest.mark.parametrize("name", EBT_VARIANTS)
def test_inference_trajectory_matches_paper(vectors_dir, name, dtype):
    model, _, expected = _load(vectors_dir, name, dtype)
    tokens = expected["tokens_with_target"][:, :-1]
    trajectory = model.think(tokens, init=expected["init"].to(dtype))
    assert len(trajectory.states) == len(expected["states"])
    for ours, theirs in zip(trajectory.states, expected["states"], strict=True):
        assert relative(ours, theirs.to(dtype)) < TOLERANCE[dtype]
    for ours, theirs in zip(trajectory.energies, expected["energies"], strict=True):
        assert relative(ours, theirs.to(dtype)) < TOLERANCE[dtype]


def _parameter_gradients_match(model, expected, tolerance: float = 1e-4) -> None:
    parameters = dict(model.named_parameters())
    assert len(expected["train_grads"]) == sum(p.requires_grad for p in parameters.values())
    for name, gradient in expected["train_grads"].items():
        ours = parameters[our_key(name)].grad
        assert ours is not None, name
        assert relative(ours, gradient.to(ours.dtype)) < tolerance, name


@DTYPES
@pytest.mark.parametrize("name", EBT_VARIANTS)
def test_training_loss_and_second_order_gradients_match_paper(
    vectors_dir, name, dtype, monkeypatch
):
    model, config, expected = _load(vectors_dir, name, dtype)
    init = expected["init"].to(dtype)
    monkeypatch.setattr("ebt.modalities.text.initial_state", lambda *args: init.clone())
    objective = Objective(model, config.think).train()
    output = objective(expected["tokens_with_target"])
    output.loss.backward()
    assert output.loss.item() == pytest.approx(expected["train_loss"].item(), rel=1e-5)
    initial, final = output.metrics["initial_loss"], output.metrics["final_step_loss"]
    assert initial.item() == pytest.approx(expected["train_initial_ce"].item(), rel=1e-5)
    assert final.item() == pytest.approx(expected["train_final_ce"].item(), rel=1e-5)
    _parameter_gradients_match(model, expected, TOLERANCE[dtype])


def test_transformer_pp_matches_paper(vectors_dir):
    model, config, expected = _load(vectors_dir, "transformer_pp")
    output = Objective(model, config.think).train()(expected["tokens_with_target"])
    output.loss.backward()
    assert output.loss.item() == pytest.approx(expected["train_loss"].item(), rel=1e-6)
    _parameter_gradients_match(model, expected)
