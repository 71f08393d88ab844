"""A full disk or a read-only filesystem while ebt writes an output (a tokenizer, a plot, a
report's markdown, a save_pretrained directory): one line through the CLI that names the file
and the cause, a non-zero exit, no temporary file left, and the previous file unchanged.

The fault is injected without root: `os.fsync` raises for the temporary file of the target
(found through /proc/self/fd), as a filesystem that runs out of space at the flush would."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch
from support.text import TINY, tiny_overrides

from ebt.cli.main import main
from ebt.errors import MachineError
from ebt.interop.hub import save_pretrained

FAULTS = {"ENOSPC": "no space left on device", "EROFS": "read-only file system"}


def fail_writes_to(monkeypatch: pytest.MonkeyPatch, target: Path, name: str) -> None:
    """fsync of the temporary file of `target` (`.STEM-xxxx.partial.SUFFIX`) raises errno `name`."""
    real_fsync = os.fsync
    pattern = re.compile(
        rf"\.{re.escape(target.stem)}-[0-9a-f]{{8}}\.partial{re.escape(target.suffix)}"
    )

    def fsync(fd: int) -> None:
        written = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if written.parent == target.parent and pattern.fullmatch(written.name):
            code = getattr(errno, name)
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes."""
    found = sorted(path for path in folder.rglob("*") if path.is_file())
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in found}


def faulted(argv: list[str], target: Path, name: str, monkeypatch, capsys) -> str:
    """Run `ebt argv` with writes to `target` failing: exit 2, one line; returns the line."""
    with monkeypatch.context() as patch:
        fail_writes_to(patch, target, name)
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith(f"ebt: error: cannot write {target}: {FAULTS[name]}")
    return line


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_a_tokenizer_save_fault_is_one_line_and_keeps_the_old_tokenizer(
    tmp_path, corpus, monkeypatch, capsys, name
):
    out = tmp_path / "bpe"
    argv = ["tokenizer", "train", "--source", str(corpus), "--vocab-size", "300"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    before = files(out)
    argv[argv.index("300")] = "320"  # a different tokenizer would replace it
    line = faulted(argv, out / "tokenizer.json", name, monkeypatch, capsys)
    assert line.endswith("; the previous tokenizer.json is unchanged")
    assert files(out) == before  # nothing else, no temporary


@pytest.fixture
def trained(tmp_path: Path, corpus: Path, capsys) -> Path:
    run = tmp_path / "run"
    argv = ["train", str(TINY), *tiny_overrides(run, corpus), "train.max_steps=2"]
    assert main(argv) == 0
    capsys.readouterr()
    return run


@pytest.mark.parametrize("name", sorted(FAULTS))
@pytest.mark.parametrize("written", ["report-curves.png", "report.md"], ids=["plot", "markdown"])
def test_a_report_write_fault_is_one_line_and_keeps_the_old_report(
    trained, tmp_path, monkeypatch, capsys, name, written
):
    """`ebt report`: its curves plot (a figure) and its markdown; the earlier report stays."""
    folder = tmp_path / "report"
    argv = ["report", str(trained), "-o", str(folder / "report.md")]
    assert main(argv) == 0
    capsys.readouterr()
    before = files(folder)
    line = faulted(argv, folder / written, name, monkeypatch, capsys)
    assert line.endswith(f"; the previous {written} is unchanged")
    assert files(folder) == before


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_a_first_plot_fault_leaves_nothing(trained, tmp_path, monkeypatch, capsys, name):
    """`ebt think --plot` into a folder with nothing yet: one line, and no file at all."""
    plot = tmp_path / "plots" / "thinking.png"
    argv = ["think", str(trained), "--steps", "1", "--samples", "1", "--batches", "1"]
    line = faulted([*argv, "--plot", str(plot)], plot, name, monkeypatch, capsys)
    assert line.endswith("; no thinking.png was written")
    assert files(plot.parent) == {}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_a_save_pretrained_fault_names_the_file_and_keeps_the_old_one(tmp_path, name):
    from ebt.config import Config, finalize
    from ebt.models import build_model

    config = finalize(Config())
    config.model.dim, config.model.layers, config.model.heads = 32, 1, 2
    model = build_model(config, vocab_size=257)
    folder = save_pretrained(model, tmp_path / "pretrained", config=config)
    before = files(folder)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # new weights: model.safetensors would change
    with pytest.MonkeyPatch.context() as patch:
        fail_writes_to(patch, folder / "model.safetensors", name)
        with pytest.raises(MachineError) as caught:
            save_pretrained(model, folder, config=config)
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"cannot write {folder / 'model.safetensors'}: {FAULTS[name]}; "
        "the previous model.safetensors is unchanged"
    )
    assert files(folder) == before


def test_a_writer_that_is_atomic_itself_inside_an_atomic_block_renames_once(tmp_path, monkeypatch):
    """`ebt think --plot` wraps plot_thinking, whose save_figure is atomic itself: the inner
    block writes the outer temporary (no temporary of a temporary, one rename, no leftovers)."""
    from ebt.outputs import atomic_path, write_text

    renames, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda *args: renames.append(args) or real_replace(*args))
    target = tmp_path / "plot.txt"
    with atomic_path(target) as outer:
        write_text(outer, "inner")
    assert renames == [(outer, target)] and target.read_text() == "inner"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plot.txt"]


def test_a_full_disk_at_the_token_cache_is_a_warning_and_the_run_goes_on(
    tmp_path, corpus, monkeypatch, capsys
):
    """A cache is not an output: the run trains without it and says so on stderr."""
    cache, real_replace = tmp_path / "cache", os.replace

    def replace(source, target, *args, **kwargs):
        if Path(target).is_relative_to(cache):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path / "run"
    assert main(["train", str(TINY), *tiny_overrides(run, corpus), "train.max_steps=1"]) == 0
    err = capsys.readouterr().err
    assert "ebt: could not write the token cache" in err and "no space left on device" in err
    assert not [path for path in cache.rglob("*") if path.is_file()]
