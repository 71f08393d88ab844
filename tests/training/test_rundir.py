"""Run directories: one owner at a time, truthful resume, clean stops on SIGINT / SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.text import TINY, interrupt_at, tiny_config, tiny_overrides, training_rows

from ebt.checkpoint import load_model_state, load_train_state
from ebt.cli.main import main
from ebt.config import ConfigError
from ebt.errors import RunBusyError
from ebt.training.interrupt import StopRequest, TrainingInterrupted
from ebt.training.optim import lr_multiplier
from ebt.training.rundir import RunLock
from ebt.training.tracking import read_metrics
from ebt.training.trainer import Trainer, train

HOLD_LOCK = (
    "import sys, time; from ebt.training.rundir import RunLock; lock = RunLock(sys.argv[1]); "
)
HOLD_LOCK += "lock.acquire(); print('locked', flush=True); time.sleep(120)"


def holder_process(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run's lock until it is killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_owner_fails_at_once_naming_the_holder_and_writes_nothing(tmp_path, corpus):
    run_dir = tmp_path / "run"
    holder = holder_process(run_dir)
    try:
        with pytest.raises(RunBusyError) as caught:
            train(tiny_config(run_dir, corpus))
        message = str(caught.value)
        assert f"process {holder.pid}" in message and "\n" not in message
        assert sorted(path.name for path in run_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, nothing is left stale
        holder.wait()
    train(tiny_config(run_dir, corpus, "train.max_steps=1"))
    assert (run_dir / "step_000001").is_dir()


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path, corpus):
    run_dir = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="empty"):
        train(tiny_config(run_dir, corpus, f"data.source={tmp_path / 'empty'}"))
    assert not run_dir.exists()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunBusyError, match=f"process {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    with RunLock(tmp_path / "run"):  # released on exit
        pass


def test_resume_applies_a_new_learning_rate_and_records_it(tmp_path, corpus):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, corpus, "train.max_steps=4", "train.lr=1e-3"))
    config = tiny_config(run_dir, corpus, "train.max_steps=6", "train.lr=1e-2")
    train(config)
    rows = {row["step"]: row for row in training_rows(run_dir)}
    factor = lr_multiplier(config.train)
    for step in (5, 6):  # the lr a step trained with is the one before its scheduler step
        assert rows[step]["lr/main"] == pytest.approx(1e-2 * factor(step))
    resume = [row for row in read_metrics(run_dir) if row.get("event") == "resume"]
    assert resume == [
        {
            "event": "resume",
            "step": 4,
            "changes": {"train.lr": [1e-3, 1e-2], "train.max_steps": [4, 6]},
        }
    ]
    assert json.loads((run_dir / "config.json").read_text())["train"]["lr"] == 1e-2
    _, saved = load_model_state(run_dir)
    assert saved["train"]["lr"] == 1e-2
    groups = load_train_state(run_dir)["optimizer"]["param_groups"]
    assert [group["initial_lr"] for group in groups if group["name"] == "main"] == [1e-2]


def test_unchanged_resume_restores_the_exact_learning_rates(tmp_path, corpus):
    """apply_hyperparameters gives back bit-identical numbers when nothing changed."""
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, corpus, "train.max_steps=3"))
    saved = load_train_state(run_dir)
    config = tiny_config(run_dir, corpus, "train.max_steps=3")
    from ebt.training.distributed import setup

    trainer = Trainer(config, setup("cpu"))
    assert trainer.resume_if_possible() == {}
    restored = [group["lr"] for group in trainer.optimizer.param_groups]
    assert restored == [group["lr"] for group in saved["optimizer"]["param_groups"]]


def test_resume_refuses_fixed_keys_in_one_line_and_changes_nothing(tmp_path, corpus):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, corpus, "train.max_steps=2"))
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    bad = tiny_config(run_dir, corpus, "model.dim=64", "think.steps=2", "train.max_steps=4")
    with pytest.raises(ConfigError) as caught:
        train(bad)
    message = str(caught.value)
    assert "model.dim 32 -> 64" in message and "think.steps 1 -> 2" in message
    assert "max_steps" not in message and "\n" not in message
    after = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }


def test_resume_below_the_reached_step_is_refused(tmp_path, corpus):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, corpus, "train.max_steps=3"))
    with pytest.raises(ConfigError, match="train.max_steps=2 is below the step 3"):
        train(tiny_config(run_dir, corpus, "train.max_steps=2"))


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_at_the_current_step_and_resume_is_exact(
    tmp_path, corpus, monkeypatch, number
):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(tiny_config(whole, corpus, "train.eval_every=2"))
    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3, number)
        with pytest.raises(TrainingInterrupted) as caught:
            train(tiny_config(split, corpus, "train.eval_every=2"))
    assert caught.value.exit_code == 128 + number
    assert load_train_state(split)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored
    train(tiny_config(split, corpus, "train.eval_every=2"))
    first, _ = load_model_state(whole)
    second, _ = load_model_state(split)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert training_rows(whole) == training_rows(split)
    events = [row["event"] for row in read_metrics(split) if "event" in row]
    assert events == ["interrupted", "resume"]


def test_a_second_signal_exits_at_once():
    with StopRequest() as stop:
        stop._handle(signal.SIGINT, None)
        assert stop.signal() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)


def test_stale_temporaries_are_removed_when_a_run_starts(tmp_path, corpus):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, corpus, "train.max_steps=2"))
    stale = run_dir / ".tmp-step_000004-12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    train(tiny_config(run_dir, corpus, "train.max_steps=3"))
    assert not stale.exists() and (run_dir / "step_000003").is_dir()


# `python -m ebt ARGS` whose trainer sends itself SIGINT right after step $EBT_TEST_SIGINT_AT
SIGINT_AT_STEP = """
import os, runpy, signal, sys
from ebt.training.trainer import Trainer
step, at = Trainer.train_step, int(os.environ["EBT_TEST_SIGINT_AT"])
def interrupting(self):
    row = step(self)
    if self.step == at:
        os.kill(os.getpid(), signal.SIGINT)
    return row
Trainer.train_step = interrupting
sys.argv = ["ebt", *sys.argv[1:]]
runpy.run_module("ebt", run_name="__main__")
"""


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_saves_and_exits_130_without_a_traceback(tmp_path, corpus):
    """A real `python -m ebt train` process gets SIGINT right after step 3 (sent from inside its
    training loop, no clock): it saves step 3, exits 130 with one line, and the same command
    then resumes to step 6 exactly as an uninterrupted run."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(tiny_config(whole, corpus, "train.eval_every=2"))
    argv = ["train", str(TINY), *tiny_overrides(split, corpus), "train.eval_every=2"]
    environment = os.environ | {"EBT_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.run(
        [sys.executable, "-c", SIGINT_AT_STEP, *argv],
        capture_output=True,
        text=True,
        env=environment | {"EBT_TEST_SIGINT_AT": "3"},
        timeout=300,
    )
    assert process.returncode == 130, process.stderr
    assert "Traceback" not in process.stderr, process.stderr
    assert "SIGINT at step 3: saved" in process.stderr, process.stderr
    assert load_train_state(split)["step"] == 3
    assert sorted(path.name for path in split.glob("step_*")) == ["step_000003"]
    assert main(argv) == 0  # the same command, in this process: resumes from step 3
    first, _ = load_model_state(whole)
    second, _ = load_model_state(split)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert training_rows(whole) == training_rows(split)


def test_resume_after_truncating_the_latest_checkpoint_falls_back_exactly(tmp_path, corpus, capfd):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(tiny_config(whole, corpus, "train.save_every=2", "train.schedule_steps=6"))
    train(
        tiny_config(
            broken, corpus, "train.save_every=2", "train.schedule_steps=6", "train.max_steps=4"
        )
    )
    latest = broken / "step_000004" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    capfd.readouterr()
    train(tiny_config(broken, corpus, "train.save_every=2", "train.schedule_steps=6"))  # from 2
    assert "step_000004 is unreadable" in capfd.readouterr().err
    first, _ = load_model_state(whole)
    second, _ = load_model_state(broken)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert training_rows(whole) == training_rows(broken)


def test_a_torn_metrics_line_keeps_the_resume_record_and_the_run_exact(tmp_path, corpus, capfd):
    """A crash mid-write leaves `{"step": 5, "lo` at the end of metrics.jsonl: the resume moves
    it aside, logs its resume row on a line of its own, and continues bit for bit."""
    whole, torn = tmp_path / "whole", tmp_path / "torn"
    extra = ["train.save_every=2", "train.schedule_steps=6"]
    train(tiny_config(whole, corpus, *extra))
    train(tiny_config(torn, corpus, *extra, "train.max_steps=4"))
    with open(torn / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')
    capfd.readouterr()
    train(tiny_config(torn, corpus, *extra))
    assert "moved it aside" in capfd.readouterr().err
    lines = (torn / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line whole again
    assert [(row["event"], row["step"]) for row in rows if "event" in row] == [("resume", 4)]
    assert training_rows(torn) == training_rows(whole)
    assert (torn / "metrics.jsonl.torn").read_text() == '{"step": 5, "lo'
