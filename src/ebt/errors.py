"""User-facing errors: each carries a one-line message that the CLI prints without a traceback.

Every error a user can cause by what they type or by the files they point at derives from
`EbtError`; `ebt` prints `ebt: error: <message>` and exits with status 2 (a traceback only with
`--debug` or `EBT_DEBUG=1`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EbtError(Exception):
    """An error caused by the user's input; its message alone says what to fix."""


class CheckpointError(EbtError):
    """A checkpoint file is missing, truncated, corrupt or holds something it must not."""


class RunBusyError(EbtError):
    """Another process holds the run directory's lock."""


class WrongModalityError(EbtError, ValueError):
    """A run of one modality given to a command or call that needs another."""
