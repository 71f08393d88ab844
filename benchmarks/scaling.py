"""Data-parallel scaling: training tokens per second and peak memory per process.

How to run (the same global batch on 1 and on 2 processes):

    python benchmarks/scaling.py configs/text/tiny.toml --steps 20 train.num_threads=2
    torchrun --standalone --nproc_per_node 2 benchmarks/scaling.py configs/text/tiny.toml \\
        --steps 20 train.batch_size=8 train.num_threads=1

Every process builds the Trainer exactly as `ebt train` does (DDP, or FSDP2 with
train.parallel=fsdp, under torchrun), takes `--warmup` untimed optimizer steps, then `--steps`
timed ones, and rank 0 prints one JSON line: median seconds per step, global tokens per second
(world_size * batch_size * grad_accum * seq_len / median step), the interquartile range of the
step time, the 1-minute load average, and for every rank the median CPU seconds per step (all
threads of the process: compute plus gloo communication, much less sensitive than wall-clock
time to other programs on a shared machine), the peak resident set during the timed steps (VmHWM,
after resetting it with /proc/self/clear_refs where Linux allows; torch and the loaded token
data included) and the resident set before them. Nothing is written to disk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ebt.config import load_config
from ebt.training.distributed import gather_to_main, setup, teardown
from ebt.training.trainer import Trainer


def _status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (0 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _timed_steps(trainer: Trainer, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """(wall-clock seconds, CPU seconds of this process, all threads) of each timed step."""
    for _ in range(warmup):
        trainer.train_step()
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train_step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_intermixed_args()
    with tempfile.TemporaryDirectory() as out_dir:
        overrides = [*args.overrides, f"train.out_dir={out_dir}", "train.progress=false"]
        config = load_config(args.config, overrides)
        context = setup(config.train.device)
        trainer = Trainer(config, context)
        rss_before = _status_kib("VmRSS")
        reset = _reset_peak_rss()
        times, cpu_times = _timed_steps(trainer, args.warmup, args.steps)
        memory = {"rss_before_mib": rss_before / 1024, "vmhwm_mib": _status_kib("VmHWM") / 1024}
        memory["median_cpu_s_per_step"] = statistics.median(cpu_times)
        if context.device.type == "cuda":
            memory["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        per_rank = gather_to_main(memory)
    train = config.train
    median = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4)
    tokens = context.world_size * train.batch_size * train.grad_accum * config.data.seq_len
    if context.is_main:
        row = {
            "world_size": context.world_size,
            "parallel": train.parallel if context.enabled else "none",
            "threads_per_process": torch.get_num_threads(),
            "activation_checkpointing": train.activation_checkpointing,
            "global_batch": context.world_size * train.batch_size * train.grad_accum,
            "median_s_per_step": median,
            "iqr_s_per_step": [quartiles[0], quartiles[2]],
            "tokens_per_s": tokens / median,
            "peak_reset": reset,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "ranks": per_rank,
        }
        print(json.dumps(row), flush=True)
    if context.owns_group:
        teardown()


if __name__ == "__main__":
    main()
