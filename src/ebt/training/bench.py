"""`ebt bench train|generate`: median ms per training step / per token, and peak memory.

Training: the configured model against its same-size baseline (`config.BASELINES`: the
Transformer++ for text and video, the DiT twin for images), each on a fixed random batch of its
modality (token ids; images in [-1, 1]; video: clips of random frame vectors of frame_dim numbers,
as precomputed VAE latents would be) with the modality's training task, as `ebt train` steps.

Both models are timed in the same process, interleaved step by step, so machine noise hits
them alike and the ratio is meaningful on a shared machine. Peak memory is the peak CUDA
allocation on GPU; on CPU it is the peak resident set (VmHWM, torch's own libraries included)
of a separate child process per model.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ebt.config import Config, ConfigError
from ebt.modalities import modality_for, unit_for
from ebt.modalities.text.generate import Sampling, generate_ids
from ebt.models import build_model
from ebt.runtime import keep_freed_memory, synchronize
from ebt.training.distributed import pick_device
from ebt.training.objective import Objective
from ebt.training.optim import build_optimizer
from ebt.training.step import TrainingStep, prepare_model


def example_batch(config: Config, vocab_size: int, device: torch.device) -> torch.Tensor:
    """A random training batch of the config's modality (`ModalityUnit.example_batch`): token
    ids 1..V-1 (B, S + 1), images (B, 3, S, S) uniform in [-1, 1], or clips of frame vectors
    (B, T, frame_dim) from N(0, 1) (already-encoded frames, e.g. VAE latents; drawn from
    torch's global generator)."""
    return unit_for(config).example_batch(config, vocab_size, device)


def vocabulary_size(config: Config) -> int:
    """The text vocabulary (the config's tokenizer); 0 for images."""
    return getattr(modality_for(config), "vocab_size", 0)


class _Stepper:
    """One model + objective + optimizer taking training steps on a fixed random batch: the
    step `ebt train` takes (`ebt.training.step.TrainingStep`: the run's precision, TF32 policy,
    compilation, clipping and optimizer step).

    task: the modality's training task (default: `modality_for(config).task("train")`; text
    configs then load their tokenizer).
    """

    def __init__(
        self, config: Config, vocab_size: int, device: torch.device, task: Any = None
    ) -> None:
        torch.manual_seed(config.train.seed)
        model = build_model(config, vocab_size).to(device)
        prepare_model(model, config.train, device)  # both models alike; compiles in the warm-up
        task = task if task is not None else modality_for(config).task("train")
        self.objective = Objective(model, config.think, task=task).train()
        self.optimizer = build_optimizer(model, config.train, config.think)
        self.training_step = TrainingStep(self.objective, self.optimizer, config.train, device)
        self.batch = example_batch(config, vocab_size, device)
        self.device = device

    def step(self) -> float:
        """Seconds for one training step (forward, backward, clipping, optimizer step)."""
        synchronize(self.device)
        start = time.perf_counter()
        self.training_step(self.batch)
        synchronize(self.device)
        return time.perf_counter() - start


def interleaved_times(steppers: dict[str, Any], repeats: int, warmup: int) -> dict[str, list]:
    """Seconds per `step()` of every stepper, one step of each in turn, warm-up dropped."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for index in range(warmup + repeats):
        for name, stepper in steppers.items():
            elapsed = stepper.step()
            if index >= warmup:
                times[name].append(elapsed)
    return times


def baseline_config(config: Config) -> Config:
    """The same config with the modality's baseline model (Transformer++ or DiT)."""
    baseline = copy.deepcopy(config)
    baseline.model.kind = unit_for(config).baseline_kind()
    return baseline


def _reset_peak_rss() -> None:
    """Forget the inherited high-water mark (Linux keeps the parent's across fork + exec)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_peak_rss_child(config: Config, vocab_size: int, queue: Any) -> None:
    keep_freed_memory()  # as the parent process (the CLI) runs
    _reset_peak_rss()
    stepper = _Stepper(config, vocab_size, torch.device("cpu"))
    for _ in range(2):
        stepper.step()
    queue.put(_peak_rss_mb())


def peak_memory_mb(config: Config, vocab_size: int, device: torch.device) -> float:
    """Peak memory of training steps: CUDA max allocation, or a CPU child's peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        stepper = _Stepper(config, vocab_size, device)
        for _ in range(2):
            stepper.step()
        return torch.cuda.max_memory_allocated(device) / 2**20
    return run_in_child(_cpu_peak_rss_child, config, vocab_size)


def run_in_child(target: Any, *args: Any) -> Any:
    """target(*args, queue) in a fresh spawned process; returns what it puts on the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    value = queue.get()
    child.join()
    return value


def bench_train(
    config: Config,
    vs_baseline: bool = False,
    repeats: int = 10,
    warmup: int = 2,
    measure_memory: bool = True,
) -> dict[str, Any]:
    """Median ms per training step (and the baseline's, interleaved), the counted work, its
    rate against the device's matmul ceiling (`mfu`) and peak memory (None: not measured)."""
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    device = pick_device(config.train.device)
    modality = modality_for(config)
    vocab_size, task = getattr(modality, "vocab_size", 0), modality.task("train")
    configs = {"": config} | ({"baseline_": baseline_config(config)} if vs_baseline else {})
    steppers = {p: _Stepper(cfg, vocab_size, device, task) for p, cfg in configs.items()}
    times = interleaved_times(steppers, repeats, warmup)
    compiled = config.train.compile
    gflop = {prefix: step_gflop(stepper, compiled) for prefix, stepper in steppers.items()}
    record = steppers[""].training_step.record()
    del steppers
    ceiling = matmul_ceiling(device, record["precision"])
    result: dict[str, Any] = {
        "device": str(device),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "compile": config.train.compile,  # both models alike
        "cuda_graphs": config.train.cuda_graphs and device.type == "cuda",
        "precision": record["precision"],  # train.precision as resolved on this device
        "tf32": record["tf32"],
        "matmul_ceiling_tflops": ceiling["tflops"],
        "matmul_ceiling": ceiling,
    }
    for prefix, cfg in configs.items():
        result[f"{prefix}ms_per_step"] = 1000 * statistics.median(times[prefix])
        memory = peak_memory_mb(cfg, vocab_size, device) if measure_memory else None
        result[f"{prefix}peak_mem_mb"] = memory
        result |= throughput(prefix, gflop[prefix], result[f"{prefix}ms_per_step"], ceiling)
    if vs_baseline:
        result["ratio_vs_baseline"] = result["ms_per_step"] / result["baseline_ms_per_step"]
        # the median of per-round ratios: each round times both steps back to back, so a slow
        # spell of a shared machine hits both; steadier than the ratio of medians
        rounds = zip(times[""], times["baseline_"], strict=True)
        result["ratio_vs_baseline_paired"] = statistics.median(a / b for a, b in rounds)
    result["config"] = _reported_config(config)
    return result


def throughput(
    prefix: str, gflop: float | None, ms_per_step: float, ceiling: dict[str, Any]
) -> dict[str, Any]:
    """`gflop_per_step`, the achieved `gflops` (counted work over the step time) and `mfu`
    (achieved FLOP/s over the measured matmul ceiling), each under `prefix`; None when the
    work was not counted (compiled models)."""
    gflops = None if gflop is None else gflop / (ms_per_step / 1000)
    mfu = None if gflops is None else gflops / (ceiling["tflops"] * 1000)
    return {f"{prefix}gflop_per_step": gflop, f"{prefix}gflops": gflops, f"{prefix}mfu": mfu}


def matmul_ceiling(
    device: torch.device,
    precision: str,
    size: int | None = None,
    repeats: int = 5,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """TFLOP/s of a large square matrix product timed on `device`: the rate `mfu` divides by.
    On CUDA a bf16 product (the tensor cores' dense rate, what MFU is usually quoted against,
    whatever the run's precision); elsewhere the run's own dtype (bf16 for precision bf16,
    else float32); `dtype` overrides both. size: the matrices' side (default 8192 on CUDA, 512
    elsewhere)."""
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda or precision == "bf16" else torch.float32)
    size = size or (8192 if cuda else 512)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)  # (N, N)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)  # (N, N)
    times = []
    for index in range(repeats + 2):  # two warm-up products
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if index >= 2:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tflops = 2 * size**3 / seconds / 1e12
    return {"tflops": tflops, "dtype": str(dtype).removeprefix("torch."), "size": size}


def step_gflop(stepper: Any, compiled: bool) -> float | None:
    """GFLOP of one more `stepper.step()` (a _Stepper, or the benchmarks' steppers of the
    paper's code), counted by torch.utils.flop_counter (matrix products and convolutions);
    None for compiled models, whose graphs the counter does not see."""
    if compiled:
        return None
    with FlopCounterMode(display=False) as counter:
        stepper.step()
    return counter.get_total_flops() / 1e9


def _reported_config(config: Config) -> dict[str, Any]:
    """The config keys that shape a step: model, think and (images) the image and noise."""
    values = config.to_dict()
    reported = {"model": values["model"], "think": values["think"]}
    shape = unit_for(config).shape_keys(config)
    if shape:
        reported["data"] = shape
    return reported


GRAPH_WARMUP_TOKENS = 4  # --graphs: prefill, compilation, CUDA graph warm-up and capture


def _token_times(model, prompt: list[int], count: int, window: int, graphs: bool = False):
    """Seconds per token of cached and recompute-everything generation (and, with graphs, of
    the one-graph decoding step), one token of each in turn (so a slow spell of a shared
    machine hits all); the first token, which also pays the prompt's prefill, is dropped (with
    graphs the first GRAPH_WARMUP_TOKENS, which also pay compilation and capture)."""
    modes = {"cached": (True, Sampling()), "naive": (False, Sampling())}
    if graphs:
        modes["graphs"] = (True, Sampling(graphs=True))
    streams = {
        name: generate_ids(model, prompt, count, window, sampling, cached=cached)
        for name, (cached, sampling) in modes.items()
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(count):
        for name, stream in streams.items():
            start = time.perf_counter()
            next(stream)
            times[name].append(time.perf_counter() - start)
    skip = GRAPH_WARMUP_TOKENS if graphs else 1
    return {name: seconds[skip:] for name, seconds in times.items()}


def bench_generate(
    config: Config, new_tokens: int = 16, repeats: int = 3, graphs: bool = False
) -> dict[str, Any]:
    """Median ms per generated token near the configured context length: cached generation
    against the recompute-everything path (the paper's generator), token by token in turn;
    graphs: also the one-graph decoding step (`ebt generate --graphs`).
    Text only: image models denoise rather than generate (ConfigError)."""
    unit = unit_for(config)
    if not unit.generates_tokens:
        raise ConfigError(
            f"ebt bench generate times token generation; a {unit.name} model does "
            "not generate (use ebt bench train CONFIG --vs-baseline)"
        )
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    device = pick_device(config.train.device)
    vocab_size = vocabulary_size(config)
    torch.manual_seed(config.train.seed)
    model = build_model(config, vocab_size).to(device).eval()
    window = config.data.seq_len
    warmup = GRAPH_WARMUP_TOKENS - 1 if graphs else 0
    prompt = torch.randint(1, vocab_size, (window - new_tokens - warmup,)).tolist()
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, seconds in _token_times(
            model, prompt, new_tokens + 1 + warmup, window, graphs
        ).items():
            times[name] = times.get(name, []) + seconds
    cached_ms = 1000 * statistics.median(times["cached"])
    naive_ms = 1000 * statistics.median(times["naive"])
    paired = statistics.median(n / c for c, n in zip(times["cached"], times["naive"], strict=True))
    extra = {}
    if graphs:
        graphs_ms = 1000 * statistics.median(times["graphs"])
        extra = {
            "graphs_ms_per_token": graphs_ms,
            "graphs_speedup_vs_cached": cached_ms / graphs_ms,
        }
    return {
        "ms_per_token": cached_ms,
        "naive_ms_per_token": naive_ms,
        "speedup": naive_ms / cached_ms,
        "speedup_paired": paired,  # median of per-token ratios
        "context_length": window,
        "new_tokens": new_tokens,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "config": _reported_config(config),
    } | extra
