"""`python -m ebt` runs the command line; importing `ebt.__main__` (compile workers do) does not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_importing_the_main_module_runs_nothing():
    result = _python("-c", "import ebt.__main__; print('imported')", "train", "bench")
    assert (result.returncode, result.stdout, result.stderr) == (0, "imported\n", "")


def test_python_m_ebt_runs_the_command_line():
    result = _python("-m", "ebt", "train", "no-such-config.toml")
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`ebt presets | head -1` when head has gone: the write fails with a broken pipe (the read
    end is closed before ebt starts) and ebt ends quietly with 141, as a shell reports it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    command = [sys.executable, "-m", "ebt", "presets"]
    result = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    os.close(write_end)
    assert (result.returncode, result.stderr.decode()) == (141, "")


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[sys.executable], TORCHRUN], ids=["python", "torchrun"])
def test_train_compile_runs_through_python_m_ebt(tmp_path, corpus, launcher):
    """`python -m ebt train ... train.compile=true` and the same under torchrun (2 processes,
    gloo, DDP) with inductor's compile workers on (they import the main module again; on CUDA an
    unguarded one broke them). On CPU the workers do not reach `ebt.__main__`, so this checks
    the whole compiled path end to end; the guard itself is
    test_importing_the_main_module_runs_nothing. Both use the same shapes, so the second
    compiles from inductor's cache."""
    from support.text import TINY, tiny_overrides

    if not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        pytest.skip("inductor on CPU needs a C++ compiler")
    overrides = tiny_overrides(tmp_path / "run", corpus) + ["train.max_steps=1"]
    overrides += ["train.compile=true", "train.eval_batches=1"]
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="2", EBT_CACHE_DIR=str(tmp_path))
    env["OMP_NUM_THREADS"] = "1"
    command = [*launcher, "-m", "ebt", "train", str(TINY), *overrides, "--json"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["step"] == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["compile"]
