"""Data-parallel training on 2 CPU processes (gloo): DDP and FSDP2 second-order gradients equal
one process's on the same global batch, a 2-process run resumes exactly, only rank 0 writes, and
the torchrun command line trains one run directory.

Gradients are compared in float64: there the only differences are rounding (about 1e-14), so a
tight tolerance catches any missing second-order term. In float32 the same comparisons differ by
up to 5e-7 (S1) and 2e-5 (S2: three chained steps without detach amplify the rounding of the
different matmul shapes of 4 and 8 rows).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support.text import SYSTEM2, TINY, training_rows, write_corpus

import ebt.thinking
from ebt.checkpoint import load_model_state, load_train_state
from ebt.config import Config, load_config
from ebt.distributed import setup, sync_replicated_grads, wrap_objective
from ebt.models import build_model
from ebt.objective import Objective, backward
from ebt.thinking import recomputed_step
from ebt.tracking import read_metrics
from ebt.train import train

WORLD = 2
ROWS = 4  # rows per rank; the global batch is WORLD * ROWS
MODEL = ["model.dim=32", "model.layers=2", "model.heads=2", "data.seq_len=16"]
DETERMINISTIC_S2 = [  # S2's graph (one landscape, truncate, no detach) without per-rank noise
    "think.landscapes=1",
    "think.steps=3",
    "think.step_size=5",
    "think.step_size_learnable=false",
    "think.truncate=true",
    "think.detach=false",
]
CASES = {  # name -> (overrides, compare with one forward on the whole global batch)
    "s1": (["model.variant=pred_step", "think.init=zeros"], True),
    "s2": (DETERMINISTIC_S2 + ["think.init=zeros"], True),
    "s2-random": ([o for o in SYSTEM2 if "replay" not in o], False),
}


def _entry(rank: int, fn: Callable, init_method: str, backend: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
        dist.barrier()  # both ranks done with every collective before the group goes away
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, *args: Any, backend: str = "gloo") -> None:
    """Run fn(rank, *args) in WORLD fresh processes that share a process group. They meet
    through a fresh file, not a TCP port (a free port found first can be taken by another
    process before the group binds it)."""
    with tempfile.TemporaryDirectory() as folder:
        init_method = f"file://{folder}/rendezvous"
        mp.spawn(_entry, args=(fn, init_method, backend, args), nprocs=WORLD)


def case_config(name: str) -> Config:
    return load_config(TINY, MODEL + CASES[name][0])


def global_batch() -> torch.Tensor:
    """WORLD * ROWS examples without pad ids, so every shard has the same number of targets."""
    generator = torch.Generator().manual_seed(7)
    return torch.randint(1, 257, (WORLD * ROWS, 17), generator=generator)


def fresh_objective(config: Config, device: str = "cpu") -> Objective:
    torch.manual_seed(0)
    return Objective(build_model(config, 257).to(device), config.think).train()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _gradient_worker(rank: int, out: Path, backend: str, parallels: tuple[str, ...]) -> None:
    torch.set_default_dtype(torch.float64)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    context = setup(device)
    for parallel, name in [(parallel, name) for parallel in parallels for name in CASES]:
        objective = fresh_objective(case_config(name), device)
        wrapped = wrap_objective(objective, context, parallel)
        torch.manual_seed(100 + rank)  # the reference replays these per-rank streams
        shard = global_batch()[rank::WORLD].to(device)  # (ROWS, S + 1)
        backward(wrapped(shard).loss, objective.model)
        sync_replicated_grads(objective.model)
        grads = {
            n: _full(p.grad).cpu()
            for n, p in objective.model.named_parameters()
            if p.grad is not None
        }
        if rank == 0:
            torch.save(grads, out / f"{parallel}-{name}.pt")


def reference_gradients(name: str) -> dict[str, torch.Tensor]:
    """One process: one forward on the global batch, or (for per-rank random streams) the
    mean of the shards' gradients, each shard drawn from its rank's seeded stream."""
    objective, batch = fresh_objective(case_config(name)), global_batch()
    if CASES[name][1]:
        backward(objective(batch).loss, objective.model)
    for rank in [] if CASES[name][1] else range(WORLD):
        torch.manual_seed(100 + rank)
        backward(objective(batch[rank::WORLD]).loss / WORLD, objective.model)
    return {n: p.grad for n, p in objective.model.named_parameters() if p.grad is not None}


def max_relative_difference(got: dict, expected: dict) -> float:
    """max over parameters of max|got - expected| / max|expected|."""
    assert got.keys() == expected.keys()
    return max(
        ((got[n] - expected[n]).abs().max() / expected[n].abs().max().clamp(min=1e-30)).item()
        for n in expected
    )


def check_gradients(folder: Path, parallel: str) -> None:
    torch.set_default_dtype(torch.float64)
    try:
        for name in CASES:
            got = torch.load(folder / f"{parallel}-{name}.pt", weights_only=True)
            difference = max_relative_difference(got, reference_gradients(name))
            print(f"{parallel} {name}: max relative gradient difference {difference:.2e}")
            assert got["energy_head.weight"].dtype == torch.float64
            assert difference < 1e-10, (parallel, name, difference)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def gradient_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-process spawn computes the DDP and the FSDP2 gradients of every case."""
    folder = tmp_path_factory.mktemp("gradients")
    spawn(_gradient_worker, folder, "gloo", ("ddp", "fsdp"))
    return folder


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_data_parallel_gradients_equal_one_process(gradient_folder, parallel):
    """S1 and S2 second-order gradients of 2 ranks == one process on the same global batch."""
    check_gradients(gradient_folder, parallel)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA devices")
def test_fsdp_gradients_equal_one_process_on_gpu(tmp_path):
    """The same FSDP2 check with NCCL on 2 GPUs (never run here: no GPU on the dev machine)."""
    spawn(_gradient_worker, tmp_path, "nccl", ("fsdp",), backend="nccl")
    check_gradients(tmp_path, "fsdp")


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    """Non-reentrant recomputation of thinking steps is exact under double backward, Langevin
    noise and random step sizes included (the recomputation replays the RNG draws)."""
    recomputed = []

    def counting_step(*args: Any, **kwargs: Any) -> Any:
        recomputed.append(1)
        return recomputed_step(*args, **kwargs)

    monkeypatch.setattr(ebt.thinking, "recomputed_step", counting_step)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine can be 10x slower
    try:
        compare_recomputed_gradients()
    finally:
        torch.set_num_threads(threads)
    assert len(recomputed) >= len(CASES)  # every recipe took at least one recomputed step


def compare_recomputed_gradients() -> None:
    for name in CASES:
        grads = []
        for recompute in (False, True):
            objective = fresh_objective(case_config(name))
            objective.activation_checkpointing = recompute
            torch.manual_seed(100)
            backward(objective(global_batch()).loss, objective.model)
            grads.append(
                {n: p.grad for n, p in objective.model.named_parameters() if p.grad is not None}
            )
        assert max_relative_difference(grads[1], grads[0]) < 1e-6, name


def _audit_writes(root: Path) -> list[str]:
    """Record every file created, opened for writing, renamed or deleted under root."""
    writes: list[str] = []
    flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    events = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"}

    def hook(event: str, args: tuple) -> None:
        if (
            event == "open"
            and isinstance(args[0], str | Path)
            and str(args[0]).startswith(str(root))
        ):
            mode, flag = args[1], args[2]
            if (isinstance(mode, str) and set(mode) & set("wax+")) or (
                mode is None and flag & flags
            ):
                writes.append(f"{event} {args[0]}")
        elif event in events and str(args[0]).startswith(str(root)):
            writes.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    return writes


def run_overrides(root: Path, name: str, steps: int, parallel: str) -> list[str]:
    """A tiny 2-rank run: S2 with replay buffers (DDP), or S1 with a learnable alpha (FSDP)."""
    recipe = SYSTEM2 if parallel == "ddp" else ["model.variant=pred_step"]
    return (
        MODEL
        + recipe
        + [
            f"data.source={root / 'corpus.txt'}",
            "data.val_fraction=0.1",
            "train.batch_size=2",
            f"train.max_steps={steps}",
            "train.schedule_steps=4",
            "train.warmup_steps=1",
            "train.eval_every=2",
            "train.eval_batches=2",
            "train.log_every=1",
            "train.save_every=0",
            "train.progress=false",
            "train.device=cpu",
            f"train.parallel={parallel}",
            f"train.out_dir={root / name}",
        ]
    )


def _resume_worker(rank: int, root: Path) -> None:
    writes = _audit_writes(root) if rank else []
    os.environ["EBT_CACHE_DIR"] = str(root / "cache")
    for parallel in ("ddp", "fsdp"):
        for name, steps in (("whole", 4), ("split", 2), ("split", 4)):
            train(load_config(TINY, run_overrides(root, f"{parallel}-{name}", steps, parallel)))
    assert not writes, f"rank {rank} wrote files: {writes}"


@pytest.fixture(scope="module")
def resume_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-process spawn trains whole and split (resumed) runs with DDP and with FSDP2."""
    root = tmp_path_factory.mktemp("resume")
    write_corpus(root / "corpus.txt")
    spawn(_resume_worker, root)  # fails if rank 1 wrote any file under root
    return root


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_run_resumes_exactly_and_only_rank0_writes(resume_root, parallel):
    """4 steps at once == 2 steps, then resumed to 4 (per-rank RNG streams and replay buffers
    restored): bit-identical weights, identical logs; rank 1 writes nothing, not even caches."""
    whole_dir, split_dir = resume_root / f"{parallel}-whole", resume_root / f"{parallel}-split"
    whole, _ = load_model_state(whole_dir)
    split, _ = load_model_state(split_dir)
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[name], split[name]) for name in whole)
    assert training_rows(whole_dir) == training_rows(split_dir)
    assert [row["step"] for row in training_rows(whole_dir)] == [1, 2, 3, 4]
    ranks = load_train_state(whole_dir)["extra"]["ranks"]
    assert len(ranks) == WORLD and not torch.equal(
        ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"]
    )
    if parallel == "ddp":  # per-rank replay buffers: 4 steps x 2 fresh rows each
        assert [r["replay"]["tokens"].shape[0] for r in ranks] == [8, 8]


def test_torchrun_trains_one_run_directory(tmp_path):
    """`torchrun --nproc_per_node 2 -m ebt train ...`: one run directory, output printed once."""
    write_corpus(tmp_path / "corpus.txt")
    overrides = run_overrides(tmp_path, "run", 2, "ddp")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
    ]
    env = dict(os.environ, EBT_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        command + ["-m", "ebt", "train", str(TINY), *overrides, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.strip().splitlines()) == 1  # the final evaluation, from rank 0 only
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        ".lock",  # rank 0's, for every rank
        "config.json",
        "latest",
        "metrics.jsonl",
        "step_000002",
        "tokenizer",
    ]
    assert [row["step"] for row in read_metrics(tmp_path / "run") if "split" not in row] == [1, 2]
