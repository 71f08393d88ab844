"""`ebt bench train` on video configs: the video EBT against its Transformer++ twin on random
frame vectors of data.frame_dim numbers (as precomputed VAE latents). No timing assertions."""

from __future__ import annotations

import json

import pytest
import torch
from support import ROOT
from support.vision import VIDEO_SHRINK

from ebt.cli.main import main
from ebt.config import load_config
from ebt.training.bench import example_batch

CONFIGS = ROOT / "configs" / "video"
TINY = [*VIDEO_SHRINK, "train.batch_size=2", "train.num_threads=1", "train.device=cpu"]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_train_times_the_video_ebt_against_its_transformer_pp(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CPU peak-memory child processes
    overrides = [*TINY, "data.frame_dim=100"]  # latents of a size no pixel frame has
    argv = [
        "bench",
        "train",
        str(CONFIGS / "frame-tiny.toml"),
        *overrides,
        "--vs-baseline",
        "--json",
    ]
    assert main([*argv, "--repeats", "1", "--warmup", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("ms_per_step", "peak_mem_mb", "baseline_ms_per_step", "baseline_peak_mem_mb"):
        assert result[key] > 0, key
    assert result["ratio_vs_baseline"] > 0 and result["ratio_vs_baseline_paired"] > 0
    assert result["config"]["model"]["modality"] == "video"
    assert result["config"]["data"] == {"frames": 4, "frame_dim": 100}


@pytest.mark.parametrize(("frame_dim", "expected"), [(0, 3 * 8 * 8), (3136, 3136)])
def test_video_bench_batches_are_clips_of_frame_vectors(frame_dim, expected):
    config = load_config(CONFIGS / "frame-tiny.toml", [*TINY, f"data.frame_dim={frame_dim}"])
    batch = example_batch(config, 0, torch.device("cpu"))
    assert batch.shape == (2, 4, expected) and batch.dtype == torch.float32
