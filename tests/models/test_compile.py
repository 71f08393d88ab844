"""train.compile: torch.compile of the training passes gives the eager step's loss and gradients,
and leaves evaluation / generation eager."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

import ebt.models as models
from ebt.config import finalize, load_config
from ebt.models import build_model, compile_for_training
from ebt.training.objective import Objective

HAS_COMPILER = any(shutil.which(name) for name in ("c++", "g++", "clang++"))
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="inductor on CPU needs a C++ compiler")
pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 11


def tiny_config(kind: str):
    overrides = [f"model.kind={kind}", "model.variant=pred_step", "model.dim=16"]
    overrides += ["model.layers=1", "model.heads=2", "data.seq_len=8", "think.landscapes=2"]
    return finalize(load_config(None, overrides))


def step_gradients(model, config, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    objective = Objective(model, config.think).train()
    torch.manual_seed(1)
    loss = objective.forward_backward(batch).loss
    return loss, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@needs_compiler
@pytest.mark.parametrize("kind", ["ebt", "transformer_pp"])
def test_compiled_training_step_equals_eager(kind):
    """Same loss and parameter gradients (float32: fused kernels round differently, so the
    gradients are compared by relative norm of the difference)."""
    config = tiny_config(kind)
    torch.manual_seed(0)
    eager = build_model(config, VOCAB)
    compiled = copy.deepcopy(eager)
    compile_for_training(compiled, torch.device("cpu"))
    batch = torch.randint(1, VOCAB, (2, 9))
    expected_loss, expected = step_gradients(eager, config, batch)
    loss, actual = step_gradients(compiled, config, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert actual.keys() == expected.keys()
    for name, gradient in expected.items():
        error = (actual[name] - gradient).norm() / gradient.norm()
        assert error < 1e-4, (name, error.item())
    passes = [compiled.compiled_forward] if kind == "transformer_pp" else compiled.compiled_passes
    assert passes  # the compiled path really ran: see the next test for the eager fallback


def test_a_deep_copy_of_a_compiled_model_runs_its_own_weights(monkeypatch):
    """The compiled passes take the model as an argument: a copy with other weights gives other
    energies, not the original's."""
    monkeypatch.setattr(torch, "compile", lambda function, **_: function)  # the wiring only
    model = build_model(tiny_config("ebt"), VOCAB)
    compile_for_training(model, torch.device("cpu"))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.blocks[0].attention.wk.weight.mul_(2)
    tokens = torch.randint(1, VOCAB, (2, 8))
    keys = [model.encode_context(tokens).keys[0], twin.encode_context(tokens).keys[0]]
    torch.testing.assert_close(keys[1], 2 * keys[0])


def test_compiled_passes_are_used_only_while_grad_is_enabled(monkeypatch):
    """Evaluation, inference thinking and generation (no grad) never call the compiled passes."""
    config = tiny_config("ebt")
    model = build_model(config, VOCAB)
    calls = []

    def fake_compile(function, **_):
        def recorded(*args, **kwargs):
            calls.append(function.__name__)
            return function(*args, **kwargs)

        return recorded

    monkeypatch.setattr(torch, "compile", fake_compile)
    compile_for_training(model, torch.device("cpu"))
    tokens = torch.randint(1, VOCAB, (2, 8))
    with torch.no_grad():
        model.think(tokens)
    assert calls == []
    step_gradients(model, config, torch.randint(1, VOCAB, (2, 9)))
    assert set(calls) == {"_context_layers", "energies_and_gradient"}


def test_compile_without_a_cpp_compiler_fails_clearly(monkeypatch):
    monkeypatch.setattr(models.shutil, "which", lambda name: None)
    model = build_model(tiny_config("ebt"), VOCAB)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        compile_for_training(model, torch.device("cpu"))
