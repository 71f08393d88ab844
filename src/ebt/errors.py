"""User-facing errors: each carries a one-line message that the CLI prints without a traceback.

Every error a user can cause by what they type or by the files they point at derives from
`EbtError`; `ebt` prints `ebt: error: <message>` and exits with status 2 (a traceback only with
`--debug` or `EBT_DEBUG=1`). Anything else is a bug and keeps its traceback.

Every error class of ebt is defined here (the modules that raise them re-export them under
their old homes: `ebt.config.ConfigError`, `ebt.data.corpus.DataError`, ...).
"""

from __future__ import annotations

import errno
from pathlib import Path


class EbtError(Exception):
    """An error caused by the user's input; its message alone says what to fix."""


class CheckpointError(EbtError):
    """A checkpoint file is missing, truncated, corrupt or holds something it must not."""


class RunBusyError(EbtError):
    """Another process holds the run directory's lock."""


class OutputError(EbtError):
    """An output path the command cannot or must not write (checked before any compute)."""


class WrongModalityError(EbtError, ValueError):
    """A run of one modality given to a command or call that needs another."""


class CheckpointFileError(CheckpointError):
    """File `path` is unusable for `reason` (one line); `refused`: the pickled thing refused."""

    def __init__(self, path: Path, reason: str, refused: str | None = None) -> None:
        self.path, self.reason, self.refused = Path(path), " ".join(reason.split()), refused
        super().__init__(f"{self.path}: {self.reason}")


class ConfigError(EbtError, ValueError):
    """A config file or override names something that does not exist or has a bad value."""


class InteropError(ConfigError):
    """A checkpoint, run or hub operation that ebt cannot carry out as asked (says why)."""


class DataError(EbtError, ValueError):
    """A data source is unknown, empty, too small or lacks the requested field."""


class TrainingInterrupted(EbtError):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is 128 + signal."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


class ThinkingError(FloatingPointError):
    """A thinking step produced a NaN or Inf gradient (a bug or a diverged model, not the
    user's input: not an EbtError, so it keeps its traceback)."""


class MachineError(EbtError):
    """A fault of the machine, not of the input: a full disk, a read-only filesystem, no
    permission. The message names the file, the cause and what is intact."""


MACHINE_CAUSES = {  # errno name -> the cause in words
    "ENOSPC": "no space left on device",
    "EDQUOT": "disk quota exceeded",
    "EROFS": "read-only file system",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EIO": "input/output error",
}


def machine_cause(error: OSError) -> str | None:
    """The cause in words when `error` is a machine fault (see MACHINE_CAUSES), else None."""
    name = errno.errorcode.get(error.errno or 0, "")
    return MACHINE_CAUSES.get(name)
