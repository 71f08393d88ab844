"""The command-line surface: library code never sees argparse; every user-named output path is
checked before any compute (a directory, a suffix that does not fit the format, a symbolic link,
one of the command's inputs, an unwritable parent: one line, status 2, nothing written), written
atomically and named in the summary; and the new-user cases of issue 21 (a missing scaling
preset named as such, a `tiles:` bar that counts tiles, a run-lock message with whole paths)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from support.vision import video_config

import ebt
from ebt.cli.main import main
from ebt.errors import RunBusyError
from ebt.modalities.image.denoise import ImageVerdict
from ebt.modalities.image.tiling import denoise_tiled
from ebt.outputs import DIRECTORY, PNG, Output, OutputError, atomic_path, check_outputs
from ebt.training.rundir import RunLock
from ebt.training.trainer import train

SOURCE = Path(ebt.__file__).parent


def fails(capsys, *argv: object) -> str:
    """`ebt ARGV` that must fail in one line with status 2: the message after `ebt: error: `."""
    capsys.readouterr()
    assert main([str(item) for item in argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ebt: error: ") and error.count("\n") == 1, error
    return error.removeprefix("ebt: error: ")


def _takes_parsed_flags(parameter: ast.arg) -> bool:
    """A parameter typed as a Namespace, or parsed flags passed as `args: Any`."""
    annotation = ast.unparse(parameter.annotation) if parameter.annotation else ""
    return "Namespace" in annotation or (parameter.arg == "args" and annotation == "Any")


def test_library_code_never_sees_argparse():
    leaks = []
    for path in SOURCE.rglob("*.py"):
        name = path.relative_to(SOURCE).as_posix()
        if name.startswith("cli/"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [alias.name for alias in node.names]
                modules += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if "argparse" in modules or "ebt.cli" in {m[:7] for m in modules}:
                    leaks.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for parameter in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                    if _takes_parsed_flags(parameter):
                        leaks.append(f"{name}:{node.lineno} ({node.name}: {parameter.arg})")
    allowed = {"__main__.py"}  # `python -m ebt` is the entry point
    assert [leak for leak in leaks if leak.split(":")[0] not in allowed] == []


# --- the helper ------------------------------------------------------------------------------


def test_check_outputs_refuses_what_it_must(tmp_path, monkeypatch):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"pixels")
    (tmp_path / "sub").mkdir()
    (tmp_path / "file").write_text("x")
    os.link(photo, tmp_path / "hard.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "elsewhere.png")
    cases = {
        str(photo): "that is an input",
        str(tmp_path / "sub" / ".." / "photo.png"): "that is an input",
        str(tmp_path / "hard.png"): "that is an input",
        str(tmp_path / "link.png"): "a symbolic link",
        str(tmp_path / "sub") + "/": "a directory",
        str(tmp_path / "sub"): "a directory",
        str(tmp_path / "out.gif"): "name a .png file",
        str(tmp_path / "file" / "out.png"): "is not a directory",
    }
    for path, message in cases.items():
        with pytest.raises(OutputError, match=message):
            check_outputs([Output("--plot", path, PNG)], inputs=[photo])
    twice = [Output("--strip", str(tmp_path / "a.png"), PNG), Output("--plot", "a.png", PNG)]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="also written by --strip"):
        check_outputs(twice)
    fine = check_outputs([Output("--plot", str(tmp_path / "new" / "deeper" / "p.png"), PNG)])
    assert len(fine) == 1 and not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "linked-dir").symlink_to(tmp_path / "sub", target_is_directory=True)
    with pytest.raises(OutputError, match="a symbolic link"):  # a directory output too
        check_outputs([Output("--out", str(tmp_path / "linked-dir"), DIRECTORY)])


def test_atomic_path_replaces_only_on_success_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "report.md"
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent and temporary.suffix == ".md"
        temporary.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("the writer failed")
    assert target.read_text() == "first"  # untouched
    assert sorted(path.name for path in target.parent.iterdir()) == ["report.md"]


# --- checked before anything loads: a run that does not exist is never reached ---------------


def test_denoise_refuses_to_overwrite_its_input_or_write_through_a_link(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    iio.imwrite(photo, np.zeros((12, 12, 3), dtype=np.uint8))
    before = photo.read_bytes()
    (tmp_path / "link.png").symlink_to(photo)
    (tmp_path / "blocker").write_text("a file")
    run = tmp_path / "no-run-here"  # never loaded: the output is refused first
    base = ["denoise", run, "--input", photo, "--output"]
    assert "that is an input" in fails(capsys, *base, photo)
    assert "that is an input" in fails(capsys, *base, tmp_path / "." / "photo.png")
    assert "a symbolic link" in fails(capsys, *base, tmp_path / "link.png")
    assert "not a directory" in fails(capsys, *base, tmp_path / "blocker" / "out.png")
    assert "--grid" in fails(capsys, "denoise", run, "--grid", tmp_path / "grid.gif")
    assert photo.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "link.png", "photo.png"]


def test_rollout_refuses_bad_picture_paths_before_rolling_out(tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file")
    (tmp_path / "strips").mkdir()
    run = tmp_path / "no-run-here"
    strip, gif = tmp_path / "strip.png", tmp_path / "r.gif"
    base = ["rollout", run, "--strip", strip, "--gif", gif]
    message = fails(capsys, *base, "--plot", tmp_path / "blocker" / "energy.png")
    assert message.startswith("--plot") and "not a directory" in message
    assert "--strip" in fails(capsys, "rollout", run, "--strip", str(tmp_path / "strips") + "/")
    assert "name a .gif file" in fails(capsys, "rollout", run, "--gif", tmp_path / "r.png")
    assert not strip.exists() and not gif.exists() and not (tmp_path / "strips.png").exists()


def test_other_commands_check_their_outputs_first(tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file")
    run = tmp_path / "no-run-here"
    assert "--tokens" in fails(capsys, "think", run, "--tokens", tmp_path / "t.png")
    assert "--plot" in fails(capsys, "think", run, "--plot", tmp_path / "blocker" / "p.png")
    assert "--plot" in fails(capsys, "probe", "dyck", run, "--plot", tmp_path / "p.txt")
    assert "-o" in fails(capsys, "report", run, "-o", tmp_path / "report.png")
    message = fails(capsys, "tokenizer", "train", "--out", tmp_path / "blocker")
    assert message.startswith("--out") and "not a directory" in message
    shift = ["experiment", "thinking-shift", run, "--plot", tmp_path / "s.pdf"]
    assert "--plot" in fails(capsys, *shift)


def test_scaling_names_a_missing_or_malformed_preset(tmp_path, capsys):
    missing = fails(capsys, "experiment", "scaling", tmp_path / "nope.toml")
    assert "not found" in missing and "nope.toml" in missing and "--axis" not in missing
    broken = tmp_path / "broken.toml"
    broken.write_text("[study\naxis = 'data'\n")
    malformed = fails(capsys, "experiment", "scaling", broken)
    assert "broken.toml" in malformed and "invalid TOML" in malformed


# --- progress and the run lock ---------------------------------------------------------------


def test_the_tiles_bar_counts_tiles(monkeypatch):
    seen = {"total": None, "done": 0}

    class Bar:
        def __init__(self, iterable=None, total=None, **kwargs):
            seen["total"] = total
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def update(self, count=1):
            seen["done"] += count

        def close(self):
            pass

    monkeypatch.setattr("ebt.modalities.image.tiling.tqdm", Bar)
    identity = lambda tiles: ImageVerdict(tiles, None, 1.0)  # noqa: E731
    image = torch.zeros(3, 20, 20)  # (C, H, W): 4 x 4 tiles of 8, stride 4
    _, _, tiles = denoise_tiled(image, identity, tile=8, stride=4, batch_size=5, progress=True)
    assert tiles == 16 and seen == {"total": 16, "done": 16}


def test_the_run_lock_message_never_cuts_a_path(tmp_path, monkeypatch):
    config = "/data/" + "c" * 150 + "/tiny.toml"
    out_dir = "train.out_dir=/runs/" + "r" * 80 + "/end"
    monkeypatch.setattr("sys.argv", ["/usr/bin/ebt", "train", config, out_dir])
    with RunLock(tmp_path / "run"), pytest.raises(RunBusyError) as caught:
        RunLock(tmp_path / "run").acquire()
    message = str(caught.value)
    assert f"ebt train {config}" in message and "(+1 more arguments)" in message
    assert "rrr" not in message  # the cut path is left out whole, not cut


# --- end to end: the rollout's text summary names its files ----------------------------------


@pytest.mark.usefixtures("one_thread")
def test_rollout_summary_names_the_files_it_wrote(tmp_path, capsys):
    train(video_config(tmp_path / "ebt", "tiny.toml"))
    pictures = tmp_path / "pictures"
    argv = ["rollout", str(tmp_path / "ebt"), "--context", "2", "--frames", "2", "--clips", "1"]
    argv += ["--strip", str(pictures / "s.png"), "--gif", str(pictures / "r.gif")]
    argv += ["--plot", str(pictures / "e.png")]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name, file in (("strip", "s.png"), ("gif", "r.gif"), ("plot", "e.png")):
        assert f"wrote {name}: {pictures / file}" in printed
    assert sorted(path.name for path in pictures.iterdir()) == ["e.png", "r.gif", "s.png"]


def test_the_final_evaluation_shows_progress(tmp_path, monkeypatch, one_thread):
    """After the `train` bar reaches 100%, the final evaluation (minutes for a DiT) has a bar."""
    import ebt.training.evaluate as evaluate_module

    bars: list[dict] = []

    def recording_tqdm(iterable, desc=None, **kwargs):
        bars.append({"desc": desc, "disable": kwargs.get("disable", False)})
        return iterable

    monkeypatch.setattr(evaluate_module, "tqdm", recording_tqdm)
    train(video_config(tmp_path / "run", "tiny.toml", "train.progress=true"))
    assert {"desc": "eval", "disable": False} in bars
