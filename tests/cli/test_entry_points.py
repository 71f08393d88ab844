"""`python -m ebt` runs the command line; importing `ebt.__main__` (compile workers do) does not."""

from __future__ import annotations

import os
import subprocess
import sys


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
