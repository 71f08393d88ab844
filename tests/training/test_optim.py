"""Optimizer parameter groups and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ebt.config import ThinkConfig, TrainConfig
from ebt.training.optim import build_optimizer, build_scheduler, lr_multiplier, lr_report


class Energy(nn.Module):
    def __init__(self, learnable: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 1)
        self.step_size = nn.Parameter(torch.tensor(500.0), requires_grad=learnable)


class Baseline(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)


def groups_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    return {group["name"]: group for group in optimizer.param_groups}


def test_energy_model_groups() -> None:
    train, think = TrainConfig(lr=1e-3, weight_decay=0.02, beta1=0.8, beta2=0.95), ThinkConfig()
    model = Energy()
    optimizer = build_optimizer(model, train, think)
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = groups_by_name(optimizer)
    assert set(groups) == {"main", "step_size"}
    alpha = groups["step_size"]
    assert alpha["params"] == [model.step_size]
    assert alpha["lr"] == pytest.approx(1e-3 * think.step_size_lr_multiplier)
    assert alpha["weight_decay"] == 0.0
    main = groups["main"]
    assert main["lr"] == pytest.approx(1e-3) and main["weight_decay"] == 0.02
    expected = {id(p) for name, p in model.named_parameters() if name != "step_size"}
    assert {id(p) for p in main["params"]} == expected  # norms and embeddings decay too
    assert main["betas"] == (0.8, 0.95)


def test_frozen_step_size_and_baseline_have_one_group() -> None:
    for model in (Energy(learnable=False), Baseline()):
        optimizer = build_optimizer(model, TrainConfig(), ThinkConfig())
        assert [group["name"] for group in optimizer.param_groups] == ["main"]
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(optimizer.param_groups[0]["params"]) == len(trainable)


def test_wrapped_model_still_finds_step_size() -> None:
    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = Energy()
    groups = groups_by_name(build_optimizer(Wrapper(model), TrainConfig(), ThinkConfig()))
    assert groups["step_size"]["params"] == [model.step_size]


def test_schedule_shape_and_per_group_floor() -> None:
    train = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    think = ThinkConfig(step_size_lr_multiplier=1500.0)
    optimizer = build_optimizer(Energy(), train, think)
    scheduler = build_scheduler(optimizer, train)
    history = []
    for _ in range(130):
        history.append(lr_report(optimizer))
        optimizer.step()
        scheduler.step()
    main = [row["lr/main"] for row in history]
    alpha = [row["lr/step_size"] for row in history]
    assert main[0] == 0.0 and alpha[0] == 0.0
    assert main[5] == pytest.approx(0.5e-3)
    assert main[10] == pytest.approx(1e-3) and alpha[10] == pytest.approx(1.5)
    assert max(main) == pytest.approx(1e-3)
    decay = main[10:111]
    assert all(b <= a + 1e-15 for a, b in zip(decay, decay[1:], strict=False))
    for step in (110, 120, 129):  # at and after the horizon: each group's own floor
        assert main[step] == pytest.approx(1e-4)
        assert alpha[step] == pytest.approx(1.5 * 0.1)


def test_schedule_steps_overrides_max_steps() -> None:
    factor = lr_multiplier(TrainConfig(warmup_steps=0, max_steps=10, schedule_steps=100))
    assert factor(0) == 1.0
    assert factor(50) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(100) == pytest.approx(0.1) and factor(1000) == pytest.approx(0.1)


def test_scheduler_state_round_trip() -> None:
    train = TrainConfig(warmup_steps=5, max_steps=50)
    optimizer = build_optimizer(Energy(), train, ThinkConfig())
    scheduler = build_scheduler(optimizer, train)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_opt = build_optimizer(Energy(), train, ThinkConfig())
    fresh = build_scheduler(fresh_opt, train)
    fresh_opt.load_state_dict(optimizer.state_dict())
    fresh.load_state_dict(state)
    assert lr_report(fresh_opt) == lr_report(optimizer)
    fresh_opt.step()
    fresh.step()
    optimizer.step()
    scheduler.step()
    assert lr_report(fresh_opt) == pytest.approx(lr_report(optimizer))


def test_plain_parameters_take_the_fused_kernel_with_the_same_update(monkeypatch) -> None:
    """Ordinary CPU parameters get PyTorch's fused AdamW; it takes the foreach update's steps
    (two groups, weight decay, the step size's own lr) to float rounding."""
    train, think = TrainConfig(lr=1e-2, weight_decay=0.1), ThinkConfig()
    torch.manual_seed(0)
    fused_model, reference = Energy(), Energy()
    reference.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, train, think)
    monkeypatch.setattr("ebt.training.optim.fused_supported", lambda params: False)
    foreach = build_optimizer(reference, train, think)
    assert fused.defaults["fused"] and not foreach.defaults["fused"]
    initial = fused_model.head.weight.detach().clone()
    for step in range(3):
        for model, optimizer in ((fused_model, fused), (reference, foreach)):
            torch.manual_seed(step)
            loss = model.head(model.norm(model.embed(torch.arange(10)))).sum() * model.step_size
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for ours, theirs in zip(fused_model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_model.head.weight, initial)


def test_sharded_or_integer_parameters_keep_the_foreach_update() -> None:
    from ebt.training.optim import fused_supported

    assert fused_supported([nn.Parameter(torch.ones(2))])
    assert not fused_supported([nn.Parameter(torch.ones(2)), torch.ones(2, dtype=torch.int64)])
    subclass = torch.ones(2).as_subclass(Subclass)  # as FSDP2's DTensor parameters are
    assert not fused_supported([nn.Parameter(torch.ones(2)), subclass])


class Subclass(torch.Tensor):
    pass
