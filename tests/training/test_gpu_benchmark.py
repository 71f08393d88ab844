"""benchmarks/gpu.py --smoke: the GPU window's one command runs its every part on CPU at tiny
sizes and writes the JSON the window will read (so the window does not discover a typo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support import CONFIGS

SCRIPT = CONFIGS.parent / "benchmarks" / "gpu.py"


def test_the_smoke_run_fills_every_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EBT_REFERENCE_DIR"}
    env |= {"EBT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout) == report
    assert report["smoke"] is True and report["device"] == "cpu"
    assert {"bf16", "float32"} <= report["ceiling"].keys()
    for size in ("paper", "m88"):
        for precision, mode in (("bf16", "eager"), ("fp32", "eager"), ("fp32", "graphs")):
            entry = report["train"][size][precision][mode]
            assert entry["precision"] == precision, entry
            for model in ("ebt", "transformer_pp"):
                assert entry[model]["ms_per_step"] > 0
                assert entry[model]["tflops"] > 0 and entry[model]["mfu_vs_bf16_ceiling"] > 0
        assert "ms_per_step" in report["train"][size]["bf16"]["compile"]["ebt"]
        for kind in ("ebt", "transformer_pp"):
            assert "EBT_REFERENCE_DIR" in report["reference"][size][kind]["skipped"]
    for size in ("tiny", "m88"):
        generation = report["generation"][size]["fp32"]
        assert generation["ms_per_token"] > 0 and generation["naive_ms_per_token"] > 0
        graphs = report["generation"][size]["fp32_graphs"]
        assert graphs["ms_per_token_cached"] > 0 and graphs["ms_per_token_graphs"] > 0
    assert report["loss"]["bf16"]["val_loss"] > 0 and report["loss"]["fp32"]["val_loss"] > 0
    assert "kernels_per_step" in report["kernels"]["bf16"]["eager"]
    assert len(report["summary"]) == 7
