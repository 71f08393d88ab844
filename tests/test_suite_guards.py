"""The suite guards itself: parity vectors cannot vanish as skips, and no test imports another."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from support import ROOT, missing_vectors

TESTS = ROOT / "tests"


def test_the_repository_carries_every_parity_vector():
    assert missing_vectors(TESTS / "vectors") == []


def test_a_run_without_the_vectors_fails_in_one_line(tmp_path):
    """Collecting a parity test with EBT_VECTORS pointing at an empty folder stops the run."""
    env = {**os.environ, "EBT_VECTORS": str(tmp_path)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    target = str(TESTS / "models" / "test_reference_parity.py")
    result = subprocess.run(
        [*command, target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    lines = [line for line in result.stdout.splitlines() if "parity vectors missing" in line]
    assert len(lines) == 1 and str(tmp_path) in lines[0] and "ebt_time_embed/ref.ckpt" in lines[0]
    assert " passed" not in result.stdout and " skipped" not in result.stdout


def test_no_test_module_imports_another():
    for path in TESTS.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0].startswith("test_")], path.name


def test_test_folders_mirror_the_packages():
    """tests/<name>/ holds the tests of src/ebt/<name> (config: the top-level config modules)."""
    folders = {path.name for path in TESTS.iterdir() if path.is_dir() and any(path.glob("test_*"))}
    packages = {path.name for path in (ROOT / "src" / "ebt").iterdir() if path.is_dir()}
    assert folders - {"config"} <= packages and "support" not in folders
    names = [path.name for path in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names))  # one basename each (pytest's default import mode)
