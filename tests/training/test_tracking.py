"""metrics.jsonl logging, optional sinks, and console formatting."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ebt.training.tracking import MetricsLogger, format_row, read_metrics, truncate_metrics


def test_rows_are_appended_and_flushed(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, {"train": {"lr": 1e-3}})
    logger.log({"step": 1, "loss": torch.tensor(2.5), "lr/main": 1e-3})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5, "lr/main": 1e-3}]  # flushed
    logger.log({"step": 2, "split": "val", "loss": np.float32(1.5), "energies": torch.ones(2)})
    logger.close()
    logger.close()
    rows = read_metrics(tmp_path)
    assert rows[1] == {"step": 2, "split": "val", "loss": 1.5, "energies": [1.0, 1.0]}
    with MetricsLogger(tmp_path, {}) as again:  # appends, never truncates
        again.log({"step": 3, "loss": float("nan")})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3] and math.isnan(rows[2]["loss"])


def test_disabled_logger_is_a_no_op(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "run", {}, tensorboard=True, wandb=True, enabled=False) as log:
        assert log.log({"step": 1, "loss": torch.tensor(1.0)}) == {"step": 1, "loss": 1.0}
    assert not (tmp_path / "run").exists()


def test_truncated_last_line_and_resume(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, {}) as logger:
        for step in range(1, 6):
            logger.log({"step": step, "loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "lo')  # a crash mid-line
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert truncate_metrics(tmp_path, after_step=3) == 2
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3]
    assert read_metrics(tmp_path / "nothing-here") == []


def test_format_row() -> None:
    line = format_row({"step": 10, "loss": torch.tensor(2.0), "lr/main": 1.2e-4, "note": "x"})
    assert line == "step 10 | loss 2.0000 | lr/main 1.200e-04 | note x"
    assert format_row({"split": "val", "step": 3, "ppl": 12.5}).startswith("val | step 3 |")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="no tensorboard")
def test_tensorboard_sink(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, {"a": 1}, tensorboard=True) as logger:
        logger.log({"step": 1, "loss": 1.0})
        logger.log({"step": 1, "split": "val", "loss": 2.0})
    assert any((tmp_path / "tensorboard").iterdir())


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="installed")
def test_missing_tensorboard_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match=r"ebt\[tracking\]"):
        MetricsLogger(tmp_path, {}, tensorboard=True)


class FakeSink:
    """Records calls; stands in for a wandb run, the wandb module and a SummaryWriter."""

    def __init__(self, **kwargs: object) -> None:
        self.kwargs, self.calls = kwargs, []

    def init(self, **kwargs: object) -> FakeSink:
        self.kwargs = kwargs
        return self

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_wandb_and_tensorboard_sinks_get_scalars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb, writers = FakeSink(), []
    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = lambda **kwargs: writers.append(FakeSink(**kwargs)) or writers[-1]
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    with MetricsLogger(tmp_path / "run", {"t": 1}, tensorboard=True, wandb=True) as logger:
        logger.log({"step": 4, "loss": torch.tensor(1.5), "flag": True, "name": "x"})
        logger.log({"step": 4, "split": "val", "loss": 2.0})
    assert wandb.kwargs == {
        "project": "ebt",
        "name": "run",
        "dir": str(tmp_path / "run"),
        "config": {"t": 1},
    }
    assert [c for c in wandb.calls if c[0] == "log"] == [
        ("log", ({"loss": 1.5},), {"step": 4}),
        ("log", ({"val/loss": 2.0},), {"step": 4}),
    ]
    assert wandb.calls[-1][0] == "finish"
    (writer,) = writers
    assert writer.kwargs == {"log_dir": str(tmp_path / "run" / "tensorboard")}
    scalars = [c[1] for c in writer.calls if c[0] == "add_scalar"]
    assert scalars == [("loss", 1.5, 4), ("val/loss", 2.0, 4)]
    assert writer.calls[-1][0] == "close"


def _torn_log(run_dir: Path, tail: str) -> Path:
    with MetricsLogger(run_dir, {}) as logger:
        for step in (1, 2):
            logger.log({"step": step, "loss": 1.0 / step})
    path = run_dir / "metrics.jsonl"
    with open(path, "a") as handle:
        handle.write(tail)  # a crash or a full disk mid-write
    return path


def test_a_torn_last_line_is_moved_aside_before_the_next_row(tmp_path: Path, capsys) -> None:
    """The next row must not be glued to the torn one ('{"step": 3, "lo{"event": ...')."""
    path = _torn_log(tmp_path, '{"step": 3, "lo')
    with MetricsLogger(tmp_path, {}) as logger:
        logger.log({"event": "resume", "step": 2})
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines][-1] == {"event": "resume", "step": 2}
    assert len(lines) == 3 and (tmp_path / "metrics.jsonl.torn").read_text() == '{"step": 3, "lo'
    assert "torn line (15 bytes" in capsys.readouterr().err
    _torn_log(tmp_path, "{")  # a second tear keeps the first one's file
    MetricsLogger(tmp_path, {}).close()
    assert (tmp_path / "metrics.jsonl.torn-2").read_text() == "{"


def test_a_whole_row_that_lost_only_its_newline_is_kept(tmp_path: Path, capsys) -> None:
    path = _torn_log(tmp_path, '{"step": 3, "loss": 0.25}')
    with MetricsLogger(tmp_path, {}) as logger:
        logger.log({"step": 4, "loss": 0.2})
    assert [row["step"] for row in read_metrics(path)] == [1, 2, 3, 4]
    assert not (tmp_path / "metrics.jsonl.torn").exists() and capsys.readouterr().err == ""


def test_readers_skip_and_count_unreadable_lines(tmp_path: Path, capsys) -> None:
    path = _torn_log(tmp_path, '{"step": 3, "loss": 0.3}\nnot json\n[1, 2]\n{"step": 4}\n{"st')
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert capsys.readouterr().err == f"ebt: warning: {path}: skipped 3 unreadable line(s)\n"
