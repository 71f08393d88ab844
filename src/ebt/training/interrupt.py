"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM.

The first signal only asks: the trainer finishes the optimizer step it is in, saves a checkpoint
at that step and raises `TrainingInterrupted`, so running the same command again resumes
exactly. A second signal exits at once (KeyboardInterrupt; checkpoints are written atomically,
so the newest complete one survives). Under torchrun every rank gets the signal; the ranks agree
on stopping through one all-reduce per step, so they stop at the same step.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import torch

from ebt.errors import TrainingInterrupted as TrainingInterrupted  # its old home

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


FAILED = -1  # StopRequest.signal: a rank failed, not a signal


class StopRequest:
    """Catches SIGINT / SIGTERM while active (`with StopRequest() as stop: ... stop.signal()`)."""

    def __init__(self) -> None:
        self.received = 0  # the first signal's number, 0 while none came
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            self._previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
            for number in STOP_SIGNALS:
                signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.received:
            raise KeyboardInterrupt  # the second signal: stop now
        self.received = number
        print(
            f"\nebt: {signal.Signals(number).name}: saving a checkpoint after this step "
            "(send it again to exit at once)",
            file=sys.stderr,
        )

    def signal(self, device: torch.device | None = None, failed: bool = False) -> int:
        """The signal to stop on, agreed by every rank (0: keep training); FAILED when any
        rank passed failed=True (rank 0 could not write its log: every rank stops)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return FAILED if failed else self.received
        flags = torch.tensor([self.received, int(failed)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return FAILED if flags[1].item() else int(flags[0].item())
