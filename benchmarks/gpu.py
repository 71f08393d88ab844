"""Everything a GPU window should measure, in one command that prints one JSON.

    python benchmarks/gpu.py --out $OUT/gpu.json            # one CUDA GPU, under 8 minutes
    python benchmarks/gpu.py --smoke --out /tmp/gpu.json    # the same code paths on CPU, tiny

With the paper's work tree (EBT_REFERENCE_DIR, see benchmarks/reference_speed.py) its code runs
side by side on the same device; without it those parts are skipped with the reason stated.

Parts, in order of priority, each under a time guard (a part that fails or runs out of time is
recorded as {"error": ...} or {"skipped": ...} and the script moves on; the whole run stops
starting parts when --budget-s is spent):
- `ceiling`: the device's measured matmul rate (bf16, and float32 with TF32), TFLOP/s;
- `train`: `ebt bench train --vs-baseline` (EBT and Transformer++) at the paper-comparison size
  (dim 256, 4 layers, seq 128, batch 8) and the 88.6M size (dim 1024, 12 layers, 16 heads, seq
  1024, batch 8, 2 landscapes, time_embed): ms/step, counted TFLOP/s, MFU against the bf16
  ceiling, peak memory; bf16 and fp32 eager, then bf16 compiled and with CUDA graphs;
- `reference`: the paper's EBT and Transformer++ at both sizes, bf16 autocast, same device;
- `generation`: `ebt bench generate` ms/token cached vs recomputing (tiny preset; 88.6M with a
  1024-token context), and the paper's generator at 88.6M; then cached eager vs the one-graph
  decoding step (`ebt generate --graphs`, CUDA graphs), tiny and 88.6M (`fp32_graphs`);
- `loss`: bf16 against fp32 validation loss after the same short run of the tiny-s2 preset;
- `kernels`: CUDA kernels per training step and GPU busy fraction (profiler), eager and graphs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_speed as paper  # noqa: E402  (the paper's-code loader and stand-ins)

from ebt.config import Config, load_config  # noqa: E402
from ebt.outputs import atomic_path  # noqa: E402
from ebt.runtime import synchronize  # noqa: E402
from ebt.training.bench import _Stepper, bench_generate, bench_train, matmul_ceiling  # noqa: E402
from ebt.training.step import autocast_region  # noqa: E402
from ebt.training.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY, TINY_S2 = ROOT / "configs" / "text" / "tiny.toml", ROOT / "configs" / "text" / "tiny-s2.toml"
SHAPE = ["model.variant=time_embed", "think.landscapes=2", "think.steps=1", "data.tokenizer=byte"]
SIZES = {
    "paper": ["model.dim=256", "model.layers=4", "model.heads=4", "data.seq_len=128"],
    "m88": ["model.dim=1024", "model.layers=12", "model.heads=16", "data.seq_len=1024"],
}
SMOKE = ["model.dim=16", "model.layers=1", "model.heads=2", "data.seq_len=16"]
COMPILE = {"eager": [], "compile": ["train.compile=true"], "graphs": ["train.compile=true"]}
COMPILE["graphs"] = COMPILE["graphs"] + ["train.cuda_graphs=true"]


class Run:
    """The device, the sizes, the deadline and the JSON being filled."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke, self.out = args.smoke, args.out
        self.device = torch.device("cpu" if args.smoke else args.device)
        self.deadline = time.monotonic() + args.budget_s
        self.repeats, self.warmup = (1, 0) if args.smoke else (args.repeats, args.warmup)
        self.result: dict[str, Any] = {
            "device": str(self.device),
            "device_name": _device_name(self.device),
            "torch": torch.__version__,
            "smoke": self.smoke,
            "budget_s": args.budget_s,
        }

    def size(self, name: str) -> list[str]:
        sizes = SMOKE if self.smoke else SIZES[name]
        return sizes + SHAPE + ["train.batch_size=2" if self.smoke else "train.batch_size=8"]

    def config(self, path: Path, overrides: list[str]) -> Config:
        return load_config(path, [*overrides, f"train.device={self.device}", "train.progress=0"])

    def part(self, keys: tuple[str, ...], limit_s: float, work: Callable[[], Any]) -> Any:
        """work() stored at result[keys...]: its value, or {"error"} / {"skipped"}."""
        left = self.deadline - time.monotonic()
        if left < min(limit_s, 30):
            value: Any = {"skipped": f"budget spent ({left:.0f} s left)"}
        else:
            started = time.monotonic()
            try:
                with _time_limit(min(limit_s, left)):
                    value = work()
            except Exception as error:  # recorded, never fatal: the next part runs
                value = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
            if isinstance(value, dict):
                value.setdefault("part_s", round(time.monotonic() - started, 1))
        target = self.result
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value
        print(f"gpu.py: {'.'.join(keys)} done", file=sys.stderr, flush=True)
        self.save()  # what is done survives a kill of the whole command
        return value

    def text(self) -> str:
        return json.dumps(self.result, indent=2, default=str)

    def save(self) -> None:
        if self.out:
            with atomic_path(self.out) as temporary:
                temporary.write_text(self.text() + "\n", encoding="utf-8")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise PartTimeout in this (main) thread after `seconds` (SIGALRM)."""

    def expire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- parts


def ceilings(run: Run) -> dict[str, Any]:
    size = 256 if run.smoke else None
    bf16 = matmul_ceiling(run.device, "bf16", size, dtype=torch.bfloat16)
    fp32 = matmul_ceiling(run.device, "fp32", size, dtype=torch.float32)  # TF32 if set
    return {"bf16": bf16, "float32": fp32, "tf32": _tf32_on()}


def _tf32_on() -> bool:
    return getattr(torch.backends.cuda.matmul, "fp32_precision", "") == "tf32"


def train_entry(run: Run, size: str, precision: str, mode: str = "eager") -> dict[str, Any]:
    """`ebt bench train --vs-baseline` of one setting, with TFLOP/s and MFU filled in for
    compiled runs from the eager count of the same setting (counts depend on shapes only).
    Compiled runs take two more warm-up steps (compilation, graph recording) and skip the
    peak-memory pass (it would compile again)."""
    overrides = run.size(size) + [f"train.precision={precision}"] + COMPILE[mode]
    config = run.config(TINY, overrides)
    eager_mode = mode == "eager"
    warmup = run.warmup + (0 if eager_mode or run.smoke else 2)
    memory = run.device.type == "cuda" and eager_mode
    result = bench_train(config, True, run.repeats, warmup, memory)
    eager = run.result.get("train", {}).get(size, {}).get(precision, {}).get("eager", {})
    ceiling = run.result.get("ceiling", {}).get("bf16", {}).get("tflops") or 0
    entry: dict[str, Any] = {"precision": result["precision"], "tf32": result["tf32"]}
    for prefix, name in (("", "ebt"), ("baseline_", "transformer_pp")):
        ms = result[f"{prefix}ms_per_step"]
        gflop = result[f"{prefix}gflop_per_step"] or eager.get(name, {}).get("gflop_per_step")
        tflops = gflop / ms if gflop else None  # GFLOP per ms = TFLOP/s
        entry[name] = {
            "ms_per_step": round(ms, 3),
            "gflop_per_step": gflop,
            "tflops": tflops,
            "mfu_vs_bf16_ceiling": tflops / ceiling if tflops and ceiling else None,
            "peak_mem_mb": result[f"{prefix}peak_mem_mb"],
        }
    entry["ebt_over_transformer_pp"] = result["ratio_vs_baseline"]
    return entry


def _hparams(run: Run, size: str) -> dict[str, Any]:
    """The paper's hyper-parameters at one of our sizes."""
    values = dict(item.split("=", 1) for item in run.size(size))
    return dict(
        paper.REFERENCE_HPARAMS,
        embedding_dim=int(values["model.dim"]),
        num_transformer_blocks=int(values["model.layers"]),
        multiheaded_attention_heads=int(values["model.heads"]),
        context_length=int(values["data.seq_len"]),
        batch_size_per_device=int(values["train.batch_size"]),
    )


def reference_path() -> str | None:
    path = os.environ.get(paper.ENV_VAR, "")
    return path if os.path.isfile(os.path.join(path, "model", "nlp", "ebt.py")) else None


REFERENCE_MISSING = {
    "skipped": f"{paper.ENV_VAR} does not point at a work tree of the paper's code "
    "(git clone https://github.com/alexiglad/EBT; see benchmarks/reference_speed.py)"
}
PAPER_MODELS = {
    "ebt": ("model.nlp.ebt", "EBT_NLP"),
    "transformer_pp": ("model.nlp.baseline_transformer", "Baseline_Transformer_NLP"),
}


def reference_entry(run: Run, size: str, kind: str, path: str) -> dict[str, Any]:
    """The paper's model alone on the device, bf16 autocast (its bf16-mixed): ms/step, peak."""
    gc.collect()  # the earlier parts' models (the paper's 88.6M EBT alone needs most of a GPU)
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(run.device)
    module, name = PAPER_MODELS[kind]
    stepper = paper._reference_stepper(path, module, name, run.device, "bf16", _hparams(run, size))
    times = [stepper.step() for _ in range(run.warmup + run.repeats)][run.warmup :]
    peak = (
        torch.cuda.max_memory_allocated(run.device) / 2**20 if run.device.type == "cuda" else None
    )
    return {"ms_per_step": round(1000 * statistics.median(times), 3), "peak_mem_mb": peak}


def generation_entry(run: Run, size: str, precision: str) -> dict[str, Any]:
    """`ebt bench generate` (tiny preset, or 88.6M with a 1024-token context)."""
    overrides = [] if size == "tiny" else run.size(size)
    if run.smoke:
        overrides = SMOKE
    config = run.config(TINY, overrides)
    new_tokens = 2 if run.smoke else 16
    with autocast_region(precision, run.device):
        result = bench_generate(config, new_tokens, 1 if run.smoke else 2)
    keys = ("ms_per_token", "naive_ms_per_token", "speedup", "context_length", "new_tokens")
    return {key: result[key] for key in keys} | {"precision": precision}


def graph_generation_entry(run: Run, size: str) -> dict[str, Any]:
    """`ebt bench generate --graphs`: cached eager generation against the one-graph decoding
    step (`ebt generate --graphs`: compiled, CUDA graphs on CUDA), ms/token, token by token in
    turn, the warm-up tokens (prefill, compilation, capture) not timed."""
    overrides = [] if size == "tiny" else run.size(size)
    config = run.config(TINY, SMOKE if run.smoke else overrides)
    result = bench_generate(config, 2 if run.smoke else 16, 1, graphs=True)
    return {
        "ms_per_token_cached": round(result["ms_per_token"], 3),
        "ms_per_token_graphs": round(result["graphs_ms_per_token"], 3),
        "speedup": round(result["graphs_speedup_vs_cached"], 3),
        "context_length": result["context_length"],
        "new_tokens": result["new_tokens"],
    }


def paper_generation(run: Run, path: str, tokens: int = 4) -> dict[str, Any]:
    """The paper's generator (whole prefix re-run per token, as its generate_text.py) at 88.6M
    with a full context: ms per token, the first token dropped; bf16 autocast."""
    hparams = _hparams(run, "m88") | {"batch_size_per_device": 1}
    context = hparams["context_length"]
    modules = paper.import_reference(path)
    torch.manual_seed(paper.SEED)
    model = modules["model.nlp.ebt"].EBT_NLP(hparams).to(run.device).eval()
    ids = torch.randint(1, paper.VOCAB, (1, context - tokens), device=run.device)  # (1, P)
    times = []
    for _ in range(tokens):
        synchronize(run.device)
        start = time.perf_counter()
        with torch.no_grad(), autocast_region("bf16", run.device):
            logits = model.forward(ids, start_pos=0, learning=False, return_raw_logits=True)
        ids = torch.cat((ids, logits[0][-1][:, -1].argmax(-1, keepdim=True)), dim=1)
        synchronize(run.device)
        times.append(time.perf_counter() - start)
    return {"ms_per_token": round(1000 * statistics.median(times[1:]), 3), "tokens": tokens}


def loss_entry(run: Run, precision: str, workdir: Path) -> dict[str, Any]:
    """Validation loss after the same short run of the tiny-s2 preset (same seed and data)."""
    steps = 2 if run.smoke else 300
    overrides = SMOKE if run.smoke else []
    overrides = overrides + [f"train.precision={precision}", f"train.max_steps={steps}"]
    overrides += ["train.eval_every=0", "train.save_every=0", "train.eval_batches=10"]
    overrides += [f"train.out_dir={workdir / precision}"]
    config = run.config(TINY_S2, overrides)
    row = train(config)
    return {"val_loss": row["loss"], "steps": steps, "precision": precision}


def kernels_entry(run: Run, precision: str, mode: str, steps: int = 3) -> dict[str, Any]:
    """CUDA kernels per training step and the GPU's busy fraction (paper size, EBT)."""
    from torch.profiler import ProfilerActivity, profile

    overrides = run.size("paper") + [f"train.precision={precision}"] + COMPILE[mode]
    stepper = _Stepper(run.config(TINY, overrides), 257, run.device)
    for _ in range(3):  # compile / capture outside the profile
        stepper.step()
    activities = [ProfilerActivity.CPU]
    activities += [ProfilerActivity.CUDA] if run.device.type == "cuda" else []
    with profile(activities=activities) as profiler:
        wall = sum(stepper.step() for _ in range(steps))
    kernels = [e for e in profiler.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)  # kernels, copies, memsets
    return {
        "kernels_per_step": len(kernels) / steps,
        "busy_fraction": busy_us / 1e6 / wall if wall else None,
        "ms_per_step": round(1000 * wall / steps, 3),
    }


# --------------------------------------------------------------------------- the run


def plan(run: Run, workdir: Path) -> list[tuple[tuple[str, ...], float, Callable[[], Any]]]:
    """(where in the JSON, time limit in s, work) of every part, most wanted first."""
    path = reference_path()
    parts: list[tuple[tuple[str, ...], float, Callable[[], Any]]] = [
        (("ceiling",), 30, lambda: ceilings(run))
    ]
    for size in ("paper", "m88"):
        parts.append((("train", size, "bf16", "eager"), 90, _bind(train_entry, run, size, "bf16")))
    for size in ("paper", "m88"):
        for kind in PAPER_MODELS:
            work = _bind(reference_entry, run, size, kind, path) if path else REFERENCE_MISSING.copy
            parts.append((("reference", size, kind), 60, work))
    for size in ("tiny", "m88"):
        parts.append((("generation", size, "fp32"), 60, _bind(generation_entry, run, size, "fp32")))
    work = _bind(paper_generation, run, path) if path else REFERENCE_MISSING.copy
    parts.append((("generation", "m88", "reference_bf16"), 60, work))
    work = _bind(graph_generation_entry, run, "tiny")
    parts.append((("generation", "tiny", "fp32_graphs"), 120, work))
    for size in ("paper", "m88"):
        parts.append((("train", size, "fp32", "eager"), 90, _bind(train_entry, run, size, "fp32")))
    for precision in ("bf16", "fp32"):
        parts.append((("loss", precision), 75, _bind(loss_entry, run, precision, workdir)))
    # whole-forward graphs need the written-out gradient, which bf16 autocast turned off
    # before issue 22's autocast work: fp32 (TF32) graphs first, bf16 ones record either way
    for mode, precision in (("compile", "bf16"), ("graphs", "fp32"), ("graphs", "bf16")):
        for size in ("paper", "m88"):
            work = _bind(train_entry, run, size, precision, mode)
            parts.append((("train", size, precision, mode), 150, work))
    for precision, mode in (("bf16", "eager"), ("fp32", "graphs"), ("bf16", "graphs")):
        work = _bind(kernels_entry, run, precision, mode)
        parts.append((("kernels", precision, mode), 60, work))
    work = _bind(graph_generation_entry, run, "m88")
    parts.append((("generation", "m88", "fp32_graphs"), 150, work))
    return parts


def _bind(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: function(*args)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets next to what was measured (None: not measured)."""

    def get(*keys: str) -> Any:
        value: Any = result
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    ours, theirs = get("train", "m88", "bf16", "eager", "ebt"), get("reference", "m88", "ebt")
    ratio = None
    if isinstance(ours, dict) and isinstance(theirs, dict) and theirs.get("ms_per_step"):
        ratio = ours["ms_per_step"] / theirs["ms_per_step"]
    losses = [get("loss", p, "val_loss") for p in ("bf16", "fp32")]
    gap = losses[0] / losses[1] - 1 if None not in losses else None
    return {
        "m88_ebt_mfu (target >= 0.30)": get(
            "train", "m88", "bf16", "eager", "ebt", "mfu_vs_bf16_ceiling"
        ),
        "m88_transformer_pp_mfu (target >= 0.35)": get(
            "train", "m88", "bf16", "eager", "transformer_pp", "mfu_vs_bf16_ceiling"
        ),
        "m88_ebt_over_paper_ms (target <= 0.12)": ratio,
        "paper_size_ebt_ms (target <= 20)": get(
            "train", "paper", "bf16", "eager", "ebt", "ms_per_step"
        ),
        "tiny_generation_ms_per_token (target <= 2)": get(
            "generation", "tiny", "fp32", "ms_per_token"
        ),
        "tiny_generation_ms_per_token_graphs (target <= 2)": get(
            "generation", "tiny", "fp32_graphs", "ms_per_token_graphs"
        ),
        "bf16_over_fp32_val_loss_minus_1 (target <= 0.02)": gap,
    }


@contextlib.contextmanager
def _smoke_compile(smoke: bool) -> Iterator[None]:
    """--smoke: torch.compile through the aot_eager backend (tracing and AOTAutograd, no C++
    build), so the compile parts' code runs on CPU in seconds."""
    if not smoke:
        yield
        return
    real = torch.compile

    def compile(function: Any = None, **options: Any) -> Any:
        options = {key: value for key, value in options.items() if key != "mode"}
        return real(function, **(options | {"backend": "aot_eager"}))

    torch.compile = compile
    try:
        yield
    finally:
        torch.compile = real


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the GPU (default cuda)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check the code")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting parts after")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--out", help="also write the JSON here (rewritten after every part)")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    run = Run(args)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as workdir, _smoke_compile(args.smoke):
        os.environ.setdefault("EBT_CACHE_DIR", str(Path(workdir) / "cache"))
        for keys, limit_s, work in plan(run, Path(workdir)):
            run.part(keys, limit_s, work)
    run.result["summary"] = summary(run.result)
    run.result["elapsed_s"] = round(time.monotonic() - started, 1)
    run.save()
    print(run.text())


if __name__ == "__main__":
    main()
