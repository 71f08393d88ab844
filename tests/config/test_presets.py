"""Presets ship inside the package and resolve by name from any directory, installed wheel too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support import ROOT

from ebt.cli.main import main
from ebt.config import ConfigError, load_config
from ebt.configs import PRESET_ROOT, find_config, preset_names


def test_every_preset_file_has_a_name_and_loads(tmp_path):
    files = sorted(PRESET_ROOT.rglob("*.toml"))
    assert len(preset_names()) == len(files) > 20 and "text/tiny" in preset_names()
    for name in preset_names():
        if not name.startswith("experiments/"):
            load_config(name)  # every shipped config resolves and validates


@pytest.mark.parametrize("spelling", ["text/tiny", "text/tiny.toml", "configs/text/tiny.toml"])
def test_a_preset_resolves_by_name_from_any_directory(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert find_config(spelling) == PRESET_ROOT / "text" / "tiny.toml"
    assert load_config(spelling).to_dict() == load_config(PRESET_ROOT / "text/tiny.toml").to_dict()


def test_a_file_wins_over_a_preset_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "tiny.toml").write_text("[model]\ndim = 48\n")
    assert load_config("text/tiny.toml").model.dim == 48


@pytest.mark.parametrize("name", ["text/nope", "../pyproject", "", "text"])
def test_an_unknown_name_is_one_line(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config(name) is None or Path(name).is_file()
    with pytest.raises(ConfigError, match="nor a shipped preset; `ebt presets` lists them"):
        load_config(name or "missing.toml")


def test_presets_command_lists_every_name(capsys):
    assert main(["presets"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == preset_names()
    assert main(["presets", "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert all(Path(path).is_file() for path in paths.values()) and list(paths) == listed


def test_the_built_wheel_ships_the_presets_and_trains_one_by_name(tmp_path):
    """Build the wheel, install it alone into a folder, train `text/tiny` outside the checkout."""
    source = tmp_path / "source"  # a clean copy: no build/ or egg-info left by earlier builds
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("ebt-*.whl")
    members = zipfile.ZipFile(wheel).namelist()
    assert (
        "ebt/configs/text/tiny.toml" in members
        and "ebt/configs/experiments/text-data.toml" in members
    )
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target"]
    subprocess.run([*install, str(tmp_path / "site"), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "EBT_CACHE_DIR": str(tmp_path)}
    run = tmp_path / "run"
    overrides = ["train.max_steps=2", "train.eval_batches=1", "train.progress=false"]
    where = [sys.executable, "-c", "import ebt; print(ebt.__file__)"]
    found = subprocess.run(where, cwd=tmp_path, env=env, capture_output=True, text=True).stdout
    assert found.startswith(str(tmp_path / "site" / "ebt"))  # the wheel's copy, not the checkout
    command = [sys.executable, "-m", "ebt", "train", "text/tiny", *overrides]
    result = subprocess.run(
        [*command, f"train.out_dir={run}"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (run / "latest").exists() and json.loads((run / "config.json").read_text())
