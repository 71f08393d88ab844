"""A checkpoint that rank 0 cannot write under torchrun (2 gloo ranks on CPU, DDP): every rank
stops with the same one line and exit status 2 instead of waiting at the barrier for a rank
that left, the process group ends the ordinary way, and the run resumes bit for bit. Covered in
one spawn: the failed write (os.fsync raising ENOSPC on rank 0 alone), the space check before it
(rank 0 sees a nearly full disk and decides for all ranks), and a metrics.jsonl row torn by a
full disk (rank 0 holds the fault until the ranks agree at the end of the step)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from support.distributed import WORLD, spawn
from support.faults import tear_the_metrics_log
from support.text import TINY, tiny_overrides, training_rows, write_corpus

from ebt.checkpoint import load_model_state
from ebt.cli.main import main
from ebt.training import rundir
from ebt.training.trainer import Trainer


def _argv(root: Path, name: str) -> list[str]:
    overrides = tiny_overrides(root / name, root / "corpus.txt")
    extra = ["train.parallel=ddp", "train.batch_size=2", "train.save_every=2"]
    return ["train", str(TINY), *overrides, *extra, "train.schedule_steps=6"]


def _main(argv: list[str]) -> list:
    """ebt's exit status and its stderr, in a spawned rank."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return [code, err.getvalue()]


def _fail_the_step_4_write(patch: pytest.MonkeyPatch) -> None:
    """The first fsync of the step-4 checkpoint (its model file) raises ENOSPC."""
    original_save, original_fsync = Trainer.save, os.fsync

    def fsync(fd: int) -> None:
        patch.setattr(os, "fsync", original_fsync)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save(self: Trainer) -> None:
        if self.step == 4:
            patch.setattr(os, "fsync", fsync)
        original_save(self)

    patch.setattr(Trainer, "save", save)


def _nearly_full_disk(patch: pytest.MonkeyPatch) -> None:
    """Free space below the step-2 checkpoint's size once that checkpoint exists."""
    real = shutil.disk_usage

    def disk_usage(path):
        usage = real(path)
        return usage._replace(free=1024) if (Path(path) / "step_000002").is_dir() else usage

    patch.setattr(rundir.shutil, "disk_usage", disk_usage)


def _tear_row_3(patch: pytest.MonkeyPatch) -> None:
    tear_the_metrics_log(patch, 3, errno.ENOSPC)


def _read_only(patch: pytest.MonkeyPatch) -> None:
    """The run directory cannot be made: a read-only filesystem."""
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args, **kwargs):
        if "read-only" in self.parts:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    patch.setattr(Path, "mkdir", mkdir)


def _worker(rank: int, root: Path) -> None:
    os.environ["EBT_CACHE_DIR"] = str(root / "cache")
    results = {"whole": _main(_argv(root, "whole"))}
    faults = {"write": _fail_the_step_4_write, "space": _nearly_full_disk, "log": _tear_row_3}
    faults["read-only"] = _read_only
    for name, fault in faults.items():
        with pytest.MonkeyPatch.context() as patch:
            if rank == 0:  # the fault is rank 0's alone: only it writes
                fault(patch)
            results[name] = _main(_argv(root, name))
        if rank == 0 and name != "read-only":  # what the failed run left (only rank 0 writes)
            results[f"{name} left"] = sorted(path.name for path in (root / name).iterdir())
            results[f"{name} latest"] = (root / name / "latest").read_text().strip()
        results[f"{name} resumed"] = _main(_argv(root, name))
    (root / f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("faults")
    write_corpus(root / "corpus.txt")
    spawn(_worker, root, timeout=300)  # a rank left waiting at a barrier fails, not hangs
    return root, [json.loads((root / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


EXPECTED = {
    "write": "step_000004: no space left on device",
    "space": "not enough space for the step-4 checkpoint",
    "log": "metrics.jsonl: no space left on device",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_rank_stops_with_rank_0s_line_and_the_run_resumes_exactly(ranks, name):
    root, results = ranks
    run = root / name
    lines = []
    for result in results:
        code, err = result[name]
        assert code == 2 and "Traceback" not in err, err
        lines.append(err.strip().splitlines()[-1])
    assert lines[0] == lines[1]  # the same line on every rank
    assert EXPECTED[name] in lines[0]
    assert f"intact: {run / 'step_000002'} (resume: ebt train {run / 'config.json'})" in lines[0]
    assert results[0][f"{name} latest"] == "step_000002"
    left = [
        ".lock",
        "config.json",
        "latest",
        "metrics.jsonl",
        "runtime.json",
        "step_000002",
        "tokenizer",
    ]
    assert results[0][f"{name} left"] == left  # no step_000004, no temporary
    assert [result[f"{name} resumed"][0] for result in results] == [0] * WORLD
    assert training_rows(run) == training_rows(root / "whole")
    got, _ = load_model_state(run)
    expected, _ = load_model_state(root / "whole")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in got)


def test_a_read_only_run_directory_stops_every_rank_with_one_line(ranks):
    """Rank 0 cannot take the run directory (it cannot make it): every rank says so."""
    root, results = ranks
    expected = f"ebt: error: cannot write {root / 'read-only'}: read-only file system"
    for result in results:
        code, err = result["read-only"]
        assert code == 2 and err.strip() == expected, err
    assert [result["read-only resumed"][0] for result in results] == [0] * WORLD
