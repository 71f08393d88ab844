"""Faults of the machine, not of the user: a full disk or a read-only filesystem while training
or writing a study's results gets one line that names the file, the cause and what is intact;
nothing half-written stays, and the run resumes from the named checkpoint bit for bit.

The faults are injected (no root needed): `os.fsync` fails at the first, middle or last file of
a checkpoint (model, config, train state), `shutil.disk_usage` reports a nearly full disk, a
directory cannot be made."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from support.faults import tear_the_metrics_log
from support.text import TINY, tiny_overrides, training_rows

from ebt.cli.main import main
from ebt.training import rundir
from ebt.training.trainer import Trainer

SAVE = ["train.save_every=2", "train.schedule_steps=6"]
FAULTS = {"ENOSPC": "no space left on device", "EROFS": "read-only file system"}


def _argv(run: Path, corpus: Path, *extra: str) -> list[str]:
    return ["train", str(TINY), *tiny_overrides(run, corpus), *SAVE, *extra]


def _fail_the_save_at(monkeypatch: pytest.MonkeyPatch, step: int, call: int, code: int) -> None:
    """The `call`-th fsync of the checkpoint at `step` raises OSError(code)."""
    original_save, original_fsync = Trainer.save, os.fsync
    calls = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == call:
            raise OSError(code, os.strerror(code))
        original_fsync(fd)

    def save(self: Trainer) -> None:
        if self.step == step:
            monkeypatch.setattr(os, "fsync", fsync)
        original_save(self)

    monkeypatch.setattr(Trainer, "save", save)


def _resumes_exactly(run: Path, whole: Path, corpus: Path, capsys) -> None:
    assert main(_argv(run, corpus)) == 0
    capsys.readouterr()
    assert training_rows(run) == training_rows(whole)


@pytest.fixture
def whole(tmp_path: Path, corpus: Path, capsys) -> Path:
    """The uninterrupted 6-step run every faulted run must end up equal to."""
    assert main(_argv(tmp_path / "whole", corpus)) == 0
    capsys.readouterr()
    return tmp_path / "whole"


@pytest.mark.parametrize("name", sorted(FAULTS))
@pytest.mark.parametrize("call", [1, 2, 3], ids=["model", "config", "train_state"])
def test_a_checkpoint_write_fault_is_one_line_and_loses_nothing(
    tmp_path, corpus, whole, monkeypatch, capsys, name, call
):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _fail_the_save_at(patch, 4, call, getattr(errno, name))
        assert main(_argv(run, corpus)) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"step_000004: {FAULTS[name]}" in err
    assert f"intact: {run / 'step_000002'}" in err and f"ebt train {run / 'config.json'}" in err
    assert sorted(path.name for path in run.iterdir() if path.name.startswith(".tmp")) == []
    assert (run / "latest").read_text().strip() == "step_000002"
    _resumes_exactly(run, whole, corpus, capsys)


def test_a_nearly_full_disk_stops_before_the_checkpoint(
    tmp_path, corpus, whole, monkeypatch, capsys
):
    """Free space below the last checkpoint's size: stop at the step boundary, write nothing."""
    run, real = tmp_path / "run", shutil.disk_usage

    def disk_usage(path):
        usage = real(path)
        full = (Path(path) / "step_000002").is_dir()
        return usage._replace(free=1024) if full else usage

    with monkeypatch.context() as patch:
        patch.setattr(rundir.shutil, "disk_usage", disk_usage)
        assert main(_argv(run, corpus)) == 2
    err = capsys.readouterr().err
    assert "not enough space for the step-4 checkpoint" in err and "0.0 MiB free" in err
    assert f"intact: {run / 'step_000002'}" in err and err.count("\n") == 1
    assert not (run / "step_000004").exists()
    _resumes_exactly(run, whole, corpus, capsys)


def test_a_read_only_output_directory_is_one_line(tmp_path, corpus, monkeypatch, capsys):
    run, real_mkdir = tmp_path / "read-only" / "run", Path.mkdir

    def mkdir(self: Path, *args, **kwargs):
        if "read-only" in self.parts:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(_argv(run, corpus)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "read-only file system" in err and "read-only" in err


def test_a_full_disk_at_the_study_results_is_one_line_and_keeps_them(
    tmp_path, corpus, monkeypatch, capsys
):
    """`ebt experiment scaling`: results.json cannot be replaced (disk full) -> one line naming
    it; the temporary file is gone and a rerun finishes the study without retraining."""
    out, real_replace = tmp_path / "study", os.replace
    argv = ["experiment", "scaling", str(TINY), *tiny_overrides(tmp_path / "unused", corpus)]
    argv += ["--axis", "steps", "--values", "2,3", "--models", "ebt", "--out", str(out)]

    def replace(source, target, *args, **kwargs):
        if str(target).endswith("results.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return real_replace(source, target, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace)
        assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the study's progress lines
    assert last == (
        f"ebt: error: cannot write {out / 'results.json'}: no space left on device; "
        "no results.json was written"
    )
    assert "Traceback" not in err and not [p for p in out.iterdir() if ".partial" in p.name]
    assert main(argv) == 0 and (out / "results.json").is_file()


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_a_full_disk_at_the_metrics_log_is_one_line_and_the_run_resumes(
    tmp_path, corpus, whole, monkeypatch, capsys, name
):
    """The step-3 row of metrics.jsonl tears (the step-2 checkpoint exists): one line naming
    the log, the cause and the intact checkpoint; the resume sets the torn half aside and
    continues bit for bit."""
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        tear_the_metrics_log(patch, 3, getattr(errno, name))
        assert main(_argv(run, corpus)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot append to {run / 'metrics.jsonl'}: {FAULTS[name]}" in err
    assert f"intact: {run / 'step_000002'}" in err
    assert main(_argv(run, corpus)) == 0
    assert "moved it aside" in capsys.readouterr().err
    assert (run / "metrics.jsonl.torn").is_file()
    assert training_rows(run) == training_rows(whole)
