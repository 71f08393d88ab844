"""benchmarks/video_motion_probe.py: its known shift moves content the named way, and the probe
runs end to end on a tiny patch-token run and a GIF."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from support.vision import video_config

from ebt.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "video_motion_probe.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def _probe_module():
    spec = importlib.util.spec_from_file_location("video_motion_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shift_moves_content_right_and_down():
    frames = torch.zeros(1, 3, 8, 8)
    frames[0, :, 2, 3] = 1.0  # one bright pixel at row 2, column 3
    moved = _probe_module().shifted(frames, 1.0, 2.0)
    assert moved[0, 0].argmax().item() == 4 * 8 + 4  # row 4, column 4
    assert torch.allclose(moved.sum(), frames.sum())
    half = _probe_module().shifted(frames, 0.5, 0.0)  # half a pixel: split between two columns
    assert half[0, 0, 2, 3].item() == pytest.approx(0.5) and half[0, 0, 2, 4] == pytest.approx(0.5)


def test_probe_runs_on_a_patch_run_and_a_gif(tmp_path):
    train(video_config(tmp_path / "ebt", "tiny.toml", "model.patch_size=2"))
    gif = tmp_path / "pan.gif"
    ramp = np.linspace(0, 255, 16, dtype=np.float32)
    frames = [np.roll(np.tile(ramp, (16, 1)), k, axis=1) for k in range(8)]  # (16, 16) each
    iio.imwrite(gif, np.stack([np.stack([f] * 3, -1) for f in frames]).astype(np.uint8))
    argv = [sys.executable, str(SCRIPT), str(tmp_path / "ebt"), "--video", str(gif)]
    argv += ["--shift", "1", "0", "--clips", "2", "--context", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(gif), "val", "test", "ood"]
    assert "true shift" in lines[0] and "best gain" in lines[-1]
