"""Our model reproduces the paper's code on its own checkpoints (../shared/vectors)."""

from __future__ import annotations

import pytest
import torch

from ebt.interop.reference import config_from_hparams, convert_state_dict, our_key
from ebt.models import build_model
from ebt.objective import Objective

EBT_VARIANTS = ["ebt_time_embed", "ebt_default", "ebt_adaln"]


def _load(vectors_dir, name):
    checkpoint = torch.load(vectors_dir / name / "ref.ckpt", weights_only=True)
    expected = torch.load(vectors_dir / name / "expected.pt", weights_only=True)
    state = convert_state_dict(checkpoint["state_dict"])
    config = config_from_hparams(checkpoint["hyper_parameters"], checkpoint["state_dict"])
    model = build_model(config, state["token_embedding.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    return model, config, expected


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("name", EBT_VARIANTS)
def test_inference_trajectory_matches_paper(vectors_dir, name):
    model, _, expected = _load(vectors_dir, name)
    tokens = expected["tokens_with_target"][:, :-1]
    trajectory = model.think(tokens, init=expected["init"])
    assert len(trajectory.states) == len(expected["states"])
    for ours, theirs in zip(trajectory.states, expected["states"], strict=True):
        assert _relative(ours, theirs) < 1e-4
    for ours, theirs in zip(trajectory.energies, expected["energies"], strict=True):
        assert _relative(ours, theirs) < 1e-4


def _parameter_gradients_match(model, expected) -> None:
    parameters = dict(model.named_parameters())
    assert len(expected["train_grads"]) == sum(p.requires_grad for p in parameters.values())
    for name, gradient in expected["train_grads"].items():
        ours = parameters[our_key(name)].grad
        assert ours is not None, name
        assert _relative(ours, gradient) < 1e-4, name


@pytest.mark.parametrize("name", EBT_VARIANTS)
def test_training_loss_and_second_order_gradients_match_paper(vectors_dir, name, monkeypatch):
    model, config, expected = _load(vectors_dir, name)
    monkeypatch.setattr("ebt.objective.initial_state", lambda *args: expected["init"].clone())
    objective = Objective(model, config.think).train()
    output = objective(expected["tokens_with_target"])
    output.loss.backward()
    assert output.loss.item() == pytest.approx(expected["train_loss"].item(), rel=1e-5)
    initial, final = output.metrics["initial_loss"], output.metrics["final_step_loss"]
    assert initial.item() == pytest.approx(expected["train_initial_ce"].item(), rel=1e-5)
    assert final.item() == pytest.approx(expected["train_final_ce"].item(), rel=1e-5)
    _parameter_gradients_match(model, expected)


def test_transformer_pp_matches_paper(vectors_dir):
    model, config, expected = _load(vectors_dir, "transformer_pp")
    output = Objective(model, config.think).train()(expected["tokens_with_target"])
    output.loss.backward()
    assert output.loss.item() == pytest.approx(expected["train_loss"].item(), rel=1e-6)
    _parameter_gradients_match(model, expected)
