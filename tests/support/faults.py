"""Machine faults injected without root, shared by the single-process and torchrun tests."""

from __future__ import annotations

import os

import pytest

from ebt.training import tracking


class TornWrites:
    """A metrics.jsonl handle whose `fail_at`-th write gets half its row onto the disk, then
    OSError(code): a disk that filled up in the middle of a row."""

    def __init__(self, handle, fail_at: int, code: int) -> None:
        self.handle, self.left, self.code = handle, fail_at, code

    def write(self, text: str) -> int:
        self.left -= 1
        if self.left == 0:
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            raise OSError(self.code, os.strerror(self.code))
        return self.handle.write(text)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)


def tear_the_metrics_log(patch: pytest.MonkeyPatch, fail_at: int, code: int) -> None:
    """MetricsLogger's `fail_at`-th row write fails half-way (see TornWrites)."""

    def opened(path, *args, **kwargs):
        return TornWrites(open(path, *args, **kwargs), fail_at, code)

    patch.setattr(tracking, "open", opened, raising=False)
