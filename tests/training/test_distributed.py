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
from pathlib import Path
from typing import Any

import pytest
import torch
from support.distributed import WORLD, RowMeans, row_batches, spawn, vision_batch
from support.text import SYSTEM2, TINY, training_rows, write_corpus
from support.vision import VISION_SYSTEM2, vision_config

import ebt.thinking.loop
from ebt.checkpoint import load_model_state, load_train_state
from ebt.config import Config, load_config
from ebt.modalities import modality_for
from ebt.models import build_model
from ebt.thinking.loop import recomputed_step
from ebt.training.distributed import setup, sync_replicated_grads, wrap_objective
from ebt.training.evaluate import evaluate
from ebt.training.objective import Objective, backward
from ebt.training.tracking import read_metrics
from ebt.training.trainer import train

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


def _worker(rank: int, root: Path) -> None:
    """Everything the 2-process tests check, in one spawn (starting ranks is the slow part)."""
    writes = _audit_writes(root) if rank else []
    os.environ["EBT_CACHE_DIR"] = str(root / "cache")
    _gradient_worker(rank, root / "gradients", "gloo", ("ddp", "fsdp"))
    _vision_gradient_worker(rank, root / "gradients")
    torch.set_default_dtype(torch.float32)
    _evaluate_worker(rank, root)
    _resume_worker(rank, root)
    _vision_resume_worker(rank, root)
    assert not writes, f"rank {rank} wrote files: {writes}"


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-process spawn: DDP and FSDP2 gradients of every text case and of image and video,
    a distributed evaluation, whole and split (resumed) text, image and video runs."""
    root = tmp_path_factory.mktemp("ranks")
    (root / "gradients").mkdir()
    write_corpus(root / "corpus.txt")
    spawn(_worker, root)  # fails if rank 1 wrote any file under root
    return root


@pytest.fixture
def gradient_folder(spawned: Path) -> Path:
    return spawned / "gradients"


@pytest.fixture
def resume_root(spawned: Path) -> Path:
    return spawned


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

    monkeypatch.setattr(ebt.thinking.loop, "recomputed_step", counting_step)
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
    for parallel in ("ddp", "fsdp"):
        for name, steps in (("whole", 4), ("split", 2), ("split", 4)):
            train(load_config(TINY, run_overrides(root, f"{parallel}-{name}", steps, parallel)))


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


KINDS = ["image", "video"]


def vision_objective(kind: str) -> Objective:
    """The S2 recipe of `kind` (random steps, step sizes, Langevin noise; no replay)."""
    recipe = [o for o in VISION_SYSTEM2[kind] if "replay" not in o]
    config = vision_config(kind, Path("unused"), *recipe)
    torch.manual_seed(0)
    model = build_model(config)
    return Objective(model, config.think, task=modality_for(config).task("train")).train()


def _vision_gradient_worker(rank: int, out: Path) -> None:
    """DDP gradients of image and video denoising, each rank on its shard with its own stream."""
    context = setup("cpu")
    for kind in KINDS:
        objective = vision_objective(kind)
        wrapped = wrap_objective(objective, context, "ddp")
        torch.manual_seed(100 + rank)
        backward(wrapped(vision_batch(kind)[rank::WORLD]).loss, objective.model)
        grads = {n: p.grad for n, p in objective.model.named_parameters() if p.grad is not None}
        if rank == 0:
            torch.save(grads, out / f"{kind}.pt")


@pytest.mark.parametrize("kind", KINDS)
def test_image_and_video_gradients_equal_one_process(gradient_folder, kind):
    """2 DDP ranks (per-rank noise, step sizes and step counts) == one process averaging the
    shards' gradients drawn from the same per-rank streams, in float64."""
    torch.set_default_dtype(torch.float64)
    try:
        objective, batch = vision_objective(kind), vision_batch(kind)
        for rank in range(WORLD):
            torch.manual_seed(100 + rank)
            backward(objective(batch[rank::WORLD]).loss / WORLD, objective.model)
        expected = {n: p.grad for n, p in objective.model.named_parameters() if p.grad is not None}
        got = torch.load(gradient_folder / f"{kind}.pt", weights_only=True)
        assert all(g.dtype == torch.float64 for g in got.values())
        assert max_relative_difference(got, expected) < 1e-10  # rounding only (~1e-15)
    finally:
        torch.set_default_dtype(torch.float32)


def vision_run(kind: str, root: Path, name: str, steps: int) -> Config:
    """A 2-rank DDP image or video run with S2 and replay buffers, scheduled over 4 steps."""
    extra = ["train.schedule_steps=4", f"train.max_steps={steps}", "train.parallel=ddp"]
    return vision_config(kind, root / f"{kind}-{name}", *VISION_SYSTEM2[kind], *extra)


def _vision_resume_worker(rank: int, root: Path) -> None:
    for kind in KINDS:
        for name, steps in (("whole", 4), ("split", 2), ("split", 4)):
            train(vision_run(kind, root, name, steps))


@pytest.mark.parametrize("kind", KINDS)
def test_two_process_image_and_video_runs_resume_exactly(resume_root, kind):
    """4 steps at once == 2 steps, then resumed to 4, on 2 ranks: the same logged row at every
    step (not only the same final weights: a resume that restarted at step 0 and trained 4
    steps again would end on other weights and log steps 1, 2, 1, 2, 3, 4), every rank's replay
    buffer and RNG stream continue where they stopped."""
    whole_dir, split_dir = resume_root / f"{kind}-whole", resume_root / f"{kind}-split"
    whole_rows, split_rows = training_rows(whole_dir), training_rows(split_dir)
    assert [row["step"] for row in split_rows] == [1, 2, 3, 4]
    for whole_row, split_row in zip(whole_rows, split_rows, strict=True):
        assert split_row == whole_row, whole_row["step"]
    whole, _ = load_model_state(whole_dir)
    split, _ = load_model_state(split_dir)
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[name], split[name]) for name in whole)
    whole_ranks = load_train_state(whole_dir)["extra"]["ranks"]
    split_ranks = load_train_state(split_dir)["extra"]["ranks"]
    for whole_rank, split_rank in zip(whole_ranks, split_ranks, strict=True):
        for key in ("tokens", "states"):
            assert torch.equal(whole_rank["replay"][key], split_rank["replay"][key])
        assert torch.equal(whole_rank["rng"]["torch"], split_rank["rng"]["torch"])


@pytest.mark.parametrize("kind", KINDS)
def test_each_rank_replays_its_own_examples(resume_root, kind, monkeypatch):
    """Rank r's replay buffer holds exactly rank r's shard of the 4 batches it trained on (4
    examples a step), in order: not the other rank's, not rank 0's on every rank."""
    monkeypatch.setenv("EBT_CACHE_DIR", str(resume_root / "cache"))
    config = vision_run(kind, resume_root, "whole", 4)
    modality = modality_for(config)
    ranks = load_train_state(resume_root / f"{kind}-whole")["extra"]["ranks"]
    assert len(ranks) == WORLD
    for rank, state in enumerate(ranks):
        batches = modality.batches(
            modality.dataset("train"), seed=config.train.seed, rank=rank, world_size=WORLD
        )
        expected = torch.cat([next(batches) for _ in range(4)])  # (4 steps x 4, ...)
        assert torch.equal(state["replay"]["tokens"], expected), rank
    assert not torch.equal(ranks[0]["replay"]["tokens"], ranks[1]["replay"]["tokens"])


EVALUATION_SIZES = ([3, 1], [2, 5])  # rank 0's and rank 1's batches: short, uneven ones


def _evaluate_worker(rank: int, root: Path) -> None:
    start = sum(EVALUATION_SIZES[0]) * rank  # the ranks hold different rows
    result = evaluate(RowMeans(), row_batches(EVALUATION_SIZES[rank], start), torch.device("cpu"))
    if rank == 0:
        torch.save(result, root / "evaluation.pt")


def test_evaluate_sums_over_ranks(resume_root):
    """evaluate() on 2 ranks with different rows and batch sizes == one process over all of
    them: the weighted sums and the weights are both summed over ranks, then divided."""
    got = torch.load(resume_root / "evaluation.pt", weights_only=True)
    every_batch = row_batches(EVALUATION_SIZES[0] + EVALUATION_SIZES[1])
    expected = evaluate(RowMeans(), every_batch, torch.device("cpu"))
    rows = torch.cat(every_batch)  # (N,)
    assert got.keys() == expected.keys() and got["rows"] == expected["rows"] == rows.numel()
    for key in ("loss", "loss_per_step", "square", "forward_passes"):
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key  # float64 sums
    assert got["loss"] == pytest.approx(rows.mean().item(), rel=1e-12)  # float64 sums


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
        "runtime.json",
        "step_000002",
        "tokenizer",
    ]
    assert [row["step"] for row in read_metrics(tmp_path / "run") if "split" not in row] == [1, 2]
