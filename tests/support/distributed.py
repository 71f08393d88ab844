"""Two gloo processes on CPU for the distributed tests: `spawn`, the tiny image and video runs
they train, and a stand-in objective whose evaluation means are known exactly.

A spawned rank ends the way `python -m ebt` ends under torchrun: it destroys its process group
and leaves through `ebt.training.distributed.exit_process`, without interpreter finalization.
Before, a rank now and then died with SIGABRT ('terminate called without an active exception')
when a gloo worker thread, still alive after `destroy_process_group()`, released a collective whose
captured thread-local state owns a Python object while the interpreter was finalizing; the
mechanism is written out in `exit_process`'s docstring.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ebt.training.distributed import exit_process, teardown

WORLD = 2


def _entry(rank: int, fn: Callable, init_method: str, backend: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=WORLD)
    fn(rank, *args)  # an exception goes to the parent through torch.multiprocessing
    dist.barrier()  # both ranks done with every collective before the group goes away
    teardown()
    exit_process(0)  # no interpreter finalization while gloo's threads live


def spawn(fn: Callable, *args: Any, backend: str = "gloo", timeout: float = 0) -> None:
    """Run fn(rank, *args) in WORLD fresh processes that share a process group. They meet
    through a fresh file, not a TCP port (a free port found first can be taken by another
    process before the group binds it). timeout > 0: a rank still running after that many
    seconds (one waiting for a rank that left) is killed and TimeoutError raised."""
    with tempfile.TemporaryDirectory() as folder:
        init_method = f"file://{folder}/rendezvous"
        ranks = mp.spawn(_entry, args=(fn, init_method, backend, args), nprocs=WORLD, join=False)
        deadline = time.monotonic() + timeout
        while not ranks.join(timeout=1.0):
            if timeout > 0 and time.monotonic() > deadline:
                for process in ranks.processes:
                    process.kill()
                raise TimeoutError(f"the {WORLD} ranks did not finish within {timeout:g} s")


def vision_batch(kind: str) -> torch.Tensor:
    """A fixed global batch of WORLD * 2 clean examples in [-1, 1] in the default dtype."""
    shape = (3, 8, 8) if kind == "image" else (4, 3, 8, 8)  # an image, or a clip of 4 frames
    generator = torch.Generator().manual_seed(11)
    return torch.rand(WORLD * 2, *shape, generator=generator) * 2 - 1  # (B, ...)


class RowTask:
    """An evaluation task whose batches (B,) of numbers count by their rows."""

    weight_name = "rows"
    quality_keys = ("square",)

    def weight(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(batch.shape[0]), dtype=torch.float64)

    def summarise(self, result: dict[str, Any]) -> dict[str, Any]:
        return result


class RowMeans(nn.Module):
    """What evaluate() sees of an objective: each batch's mean value (loss), mean square and one
    forward pass, so every weighted mean over batches is a plain mean over all rows."""

    task = RowTask()

    def forward(self, batch: torch.Tensor) -> SimpleNamespace:
        metrics = {"loss": batch.mean(), "square": batch.square().mean()}
        return SimpleNamespace(metrics=metrics | {"forward_passes": torch.tensor(1.0)})


def row_batches(sizes: list[int], start: float = 0.0) -> list[torch.Tensor]:
    """Batches (n,) of the given sizes holding start, start + 1, ... squared (uneven values)."""
    values = (torch.arange(sum(sizes), dtype=torch.float64) + start).square()  # (N,)
    return list(values.split(sizes))
