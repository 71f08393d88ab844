"""Run-directory checkpoints: round trip, `latest`, pruning, crash safety, weights_only."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ebt import checkpoint as ckpt
from ebt.config import ThinkConfig, TrainConfig
from ebt.training.optim import build_optimizer, build_scheduler

CONFIG = {"train": {"lr": 1e-3, "seed": 1}, "model": {"dim": 8}}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied: shared storage in the state dict
        self.norm = nn.LayerNorm(3)
        self.step_size = nn.Parameter(torch.tensor(2.5))


def trained(steps: int = 3) -> tuple[Tiny, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = Tiny()
    train = TrainConfig(warmup_steps=2, max_steps=20)
    optimizer = build_optimizer(model, train, ThinkConfig())
    scheduler = build_scheduler(optimizer, train)
    for _ in range(steps):
        loss = (model.norm(model.embed(torch.arange(5))) * model.step_size).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def save(run: Path, step: int, keep: int = 2, **kwargs: object) -> Path:
    model, optimizer, scheduler = trained()
    return ckpt.save_checkpoint(run, step, model, CONFIG, optimizer, scheduler, keep=keep, **kwargs)


def test_round_trip_model_optimizer_rng(tmp_path: Path) -> None:
    model, optimizer, scheduler = trained()
    extra = {"data": {"epoch": 2, "order": np.arange(4)}, "buffer": torch.ones(2, 3)}
    random.seed(7)
    step_dir = ckpt.save_checkpoint(tmp_path, 3, model, CONFIG, optimizer, scheduler, extra=extra)
    after_save = (torch.rand(4), random.random(), np.random.rand())
    assert step_dir == tmp_path / "step_000003"
    assert (tmp_path / "latest").read_text().strip() == "step_000003"

    state, config = ckpt.load_model_state(tmp_path)
    assert config == CONFIG
    fresh = Tiny()
    fresh.load_state_dict(state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name

    train_state = ckpt.load_train_state(step_dir)
    assert train_state["step"] == 3
    assert torch.equal(train_state["extra"]["data"]["order"], torch.arange(4))
    assert torch.equal(train_state["extra"]["buffer"], torch.ones(2, 3))
    fresh_opt = build_optimizer(fresh, TrainConfig(warmup_steps=2, max_steps=20), ThinkConfig())
    fresh_opt.load_state_dict(train_state["optimizer"])
    assert [g["name"] for g in fresh_opt.param_groups] == ["main", "step_size"]
    exp_avg = optimizer.state[model.step_size]["exp_avg"]
    assert torch.equal(fresh_opt.state[fresh.step_size]["exp_avg"], exp_avg)
    assert train_state["scheduler"]["last_epoch"] == scheduler.last_epoch

    ckpt.restore_rng(train_state)
    assert torch.equal(torch.rand(4), after_save[0])
    assert random.random() == after_save[1]
    assert np.random.rand() == after_save[2]


def test_train_state_is_weights_only(tmp_path: Path) -> None:
    step_dir = save(tmp_path, 1)
    state = torch.load(step_dir / "train_state.pt", weights_only=True)
    assert set(state) == {"step", "optimizer", "scheduler", "rng", "extra"}
    assert json.loads((step_dir / "config.json").read_text()) == CONFIG


def test_unsafe_extra_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="weights_only"):
        save(tmp_path, 1, extra={"bad": object()})
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert not any(tmp_path.iterdir())


def test_latest_and_pruning(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        save(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000030", "step_000040"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_000040"
    assert ckpt.latest_checkpoint(tmp_path / "step_000030") == tmp_path / "step_000030"
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "step_000040"
    assert ckpt.resolve_checkpoint(tmp_path / "step_000030") == tmp_path / "step_000030"


def test_resave_same_step_and_older_step_never_deletes_current(tmp_path: Path) -> None:
    save(tmp_path, 20)
    save(tmp_path, 20)
    save(tmp_path, 30, keep=1)
    assert [p.name for p in ckpt.step_dirs(tmp_path)] == ["step_000030"]
    save(tmp_path, 5, keep=1)  # resumed from an older point: the new one must survive
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_000005"
    assert (tmp_path / "step_000005").is_dir()


def test_crash_during_move_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = save(tmp_path, 10)
    real_replace = os.replace

    def crash(src: object, dst: object) -> None:
        if Path(str(src)).name.startswith(".tmp-step_"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path, 20)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "latest").read_text().strip() == good.name
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert not (tmp_path / "step_000020").exists()


def test_leftovers_of_a_hard_crash_are_ignored(tmp_path: Path) -> None:
    good = save(tmp_path, 10)
    half = tmp_path / ".tmp-step_000020-999"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    incomplete = tmp_path / "step_000030"  # e.g. a copy interrupted by hand
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) == good
    (tmp_path / "latest").unlink()  # even without `latest`, only complete dirs count
    assert ckpt.latest_checkpoint(tmp_path) == good
    (tmp_path / "latest").write_text("step_000099\n")  # dangling pointer
    assert ckpt.latest_checkpoint(tmp_path) == good


def test_resolve_errors_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="latest"):
        ckpt.resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ckpt.resolve_checkpoint(tmp_path / "missing")
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_non_zero_rank_does_not_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    path = save(tmp_path / "run", 10)
    assert path == tmp_path / "run" / "step_000010"
    assert not (tmp_path / "run").exists()
