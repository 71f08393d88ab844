"""Run-directory layout: file names, step directories, `latest`, pruning, stale temporaries."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"
LATEST_FILE = "latest"
STEP_PREFIX = "step_"
_FILES = (MODEL_FILE, CONFIG_FILE, TRAIN_STATE_FILE)
_TEMPORARIES = (".tmp-step_", ".old-step_", f".{LATEST_FILE}.tmp-", f".{CONFIG_FILE}.tmp-")


def step_dir_name(step: int) -> str:
    """`step_NNNNNN` (six digits, more when needed)."""
    return f"{STEP_PREFIX}{step:06d}"


def _step_of(path: Path) -> int | None:
    """The step number of a `step_NNNNNN` directory name, or None for any other name."""
    digits = path.name[len(STEP_PREFIX) :]
    if not path.name.startswith(STEP_PREFIX) or not digits.isdigit():
        return None
    return int(digits)


def _is_complete(step_dir: Path) -> bool:
    return step_dir.is_dir() and all((step_dir / name).is_file() for name in _FILES)


def _is_writer() -> bool:
    """True unless torch.distributed is initialised and this process is not rank 0."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Complete `step_*` checkpoint directories of a run, oldest (lowest step) first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [
        (step, path)
        for path in run.iterdir()
        if (step := _step_of(path)) is not None and _is_complete(path)
    ]
    return [path for _, path in sorted(found)]


def prune_checkpoints(run_dir: str | Path, keep: int, current: Path | None = None) -> list[Path]:
    """Delete older checkpoints so `keep` remain; returns what was deleted.

    `current` (the one just written) is never deleted, and checkpoints with a higher step than
    `current` (left by an abandoned timeline after resuming from an older one) are left alone.
    """
    if keep <= 0:
        return []
    dirs = step_dirs(run_dir)
    limit = None if current is None else _step_of(current)
    if limit is not None:
        dirs = [path for path in dirs if _step_of(path) < limit]
        keep -= 1
    doomed = dirs[: max(0, len(dirs) - keep)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the `.tmp-step_*`, `.old-step_*`, `.latest.tmp-*`, `.config.json.tmp-*` a crashed
    writer left; returns them. Only while holding the run's lock (no writer may be mid-write)."""
    run = Path(run_dir)
    if not _is_writer() or not run.is_dir():
        return []
    removed = [path for path in sorted(run.iterdir()) if path.name.startswith(_TEMPORARIES)]
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run dir (via `latest`), or the step dir given.

    If `latest` is missing, garbled or names something incomplete, the highest complete `step_*`
    directory is used instead; None when the run has no checkpoint. No checkpoint file is read.
    """
    path = Path(run_dir)
    if (path / MODEL_FILE).is_file():
        return path
    try:
        named = path / (path / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):  # missing or not text (UnicodeDecodeError is a ValueError)
        named = path
    if _step_of(named) is not None and _is_complete(named):
        return named
    dirs = step_dirs(path)
    return dirs[-1] if dirs else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The step directory for a run dir (follows `latest`), a step dir, or a file inside one.

    Raises FileNotFoundError naming everything it looked for.
    """
    path = Path(path)
    if path.is_file() and path.name in _FILES:
        path = path.parent
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(
            f"no checkpoint at '{path}': looked for {path / MODEL_FILE} (a step directory), "
            f"{path / LATEST_FILE} (a run directory) and complete {path}/{STEP_PREFIX}NNNNNN/ "
            f"directories holding {', '.join(_FILES)}"
        )
    return found
