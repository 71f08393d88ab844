"""Reading checkpoints: every file validated, one-line errors, fallback to an older one."""

from __future__ import annotations

import json
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ebt.checkpoint.layout import (
    CONFIG_FILE,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    _is_writer,
    latest_checkpoint,
    resolve_checkpoint,
    step_dirs,
)
from ebt.errors import CheckpointError, CheckpointFileError

_TRAIN_STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "extra")


def _first_sentence(error: BaseException) -> str:
    """An error message's first sentence on one line (torch's run on for a paragraph)."""
    return (" ".join(str(error).split()) or type(error).__name__).split(". ")[0][:200]


def read_torch_file(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`; every failure is a one-line CheckpointFileError.

    A file pickling anything but tensors and plain containers is refused, and the refusal never
    suggests unpickling it: ebt writes no such file.
    """
    if not zipfile.is_zipfile(path):
        raise CheckpointFileError(path, "not a readable torch zip archive (truncated or corrupt)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"'{found.group(1)}'" if found else "an object that is not a tensor or container"
        reason = f"refused: it holds {what} (pickled); ebt never unpickles code, so this file "
        reason += "was not written by ebt or was tampered with"
        raise CheckpointFileError(path, reason, refused=what) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = f"truncated or corrupt torch archive ({_first_sentence(error)})"
        raise CheckpointFileError(path, reason) from None


def load_model_state(
    step_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, config_dict) of a checkpoint (a step dir or a run dir), safetensors only.

    Follows `latest` without falling back (`ebt.api.load_newest_valid` does): a truncated or
    corrupt model file or a config.json that is not a JSON object raises CheckpointFileError.
    """
    resolved = resolve_checkpoint(step_dir)
    try:
        state = load_file(str(resolved / MODEL_FILE), device=str(device))
    except (SafetensorError, OSError) as error:
        how = "cannot be read" if isinstance(error, OSError) else "truncated or corrupt"
        reason = f"{how} ({_first_sentence(error)})"
        raise CheckpointFileError(resolved / MODEL_FILE, reason) from None
    path = resolved / CONFIG_FILE
    path = path if path.is_file() else resolved.parent / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_FILE} in {resolved} or {resolved.parent}") from None
    except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointFileError(path, f"not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointFileError(path, f"holds a JSON {type(config).__name__}, not an object")
    return state, config


def load_train_state(
    step_dir: str | Path, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """The `train_state.pt` dict (step, optimizer, scheduler, rng, extra); weights_only=True.

    Follows `latest` without falling back: a bad or incomplete file raises CheckpointFileError.
    """
    path = resolve_checkpoint(step_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {TRAIN_STATE_FILE} in {path.parent}")
    state = read_torch_file(path, map_location)
    missing = [key for key in _TRAIN_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointFileError(path, f"not a complete ebt train state: no {', '.join(missing)}")
    return state


@dataclass
class LoadedCheckpoint:
    """One checkpoint, read and validated; `skipped` lists (step_dir, reason) passed over."""

    step_dir: Path
    model_state: dict[str, torch.Tensor]
    config: dict[str, Any]
    train_state: dict[str, Any] | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _load_step(step_dir: Path, with_train_state: bool, device: str) -> LoadedCheckpoint:
    """Read every file of one step directory (validating it); no fallback."""
    state, config = load_model_state(step_dir, device=device)
    train_state = load_train_state(step_dir) if with_train_state else None
    return LoadedCheckpoint(step_dir, state, config, train_state)


def _fallback_order(run: Path) -> list[Path]:
    """Step dirs to try: the one `latest` names, then lower steps newest first, then higher ones.

    Higher steps than `latest`'s are left by an abandoned timeline (a resume from an older
    checkpoint), so they come last.
    """
    first, dirs = latest_checkpoint(run), step_dirs(run)  # dirs: oldest first
    if first is None:
        return []
    at = dirs.index(first) if first in dirs else len(dirs)  # `latest` may point elsewhere
    return [first, *reversed(dirs[:at]), *reversed(dirs[at + 1 :])]


def _reason(error: CheckpointFileError, step_dir: Path) -> str:
    """`model.safetensors: truncated ...`: the file relative to its step dir, and why."""
    name = error.path.name if error.path.parent == step_dir else str(error.path)
    return f"{name}: {error.reason}"


def load_newest_valid(
    path: str | Path,
    with_train_state: bool = False,
    device: str | torch.device = "cpu",
    warn: bool = True,
) -> LoadedCheckpoint:
    """The newest checkpoint of a run that actually loads, every file validated.

    Tries the step dir `latest` names, then the other complete ones (see `_fallback_order`);
    each one skipped is reported on stderr in one line (rank 0 only; `warn=False`: silent) and
    listed in `.skipped`. with_train_state: train_state.pt must load too (for resume).
    A step directory (or a file in one) given as `path` is used as it is, without fallback.
    Raises FileNotFoundError when there is no checkpoint at all, CheckpointError (one line,
    every directory and its reason) when none loads. Never writes anything.
    """
    path = Path(path)
    if path.is_file() and path.name in (MODEL_FILE, CONFIG_FILE, TRAIN_STATE_FILE):
        path = path.parent
    if (path / MODEL_FILE).is_file():  # chosen explicitly: no fallback
        return _load_step(path, with_train_state, str(device))
    candidates = _fallback_order(path) if path.is_dir() else []
    if not candidates:
        resolve_checkpoint(path)  # raises FileNotFoundError naming what it looked for
    skipped: list[tuple[Path, str]] = []
    for step_dir in candidates:
        try:
            loaded = _load_step(step_dir, with_train_state, str(device))
        except CheckpointFileError as error:
            skipped.append((step_dir, _reason(error, step_dir)))
            continue
        if warn and _is_writer():
            for bad, why in skipped:
                line = f"ebt: warning: {bad} is unreadable ({why}); using {step_dir}"
                print(line, file=sys.stderr)
        loaded.skipped = skipped
        return loaded
    listed = "; ".join(f"{bad} ({why})" for bad, why in skipped)
    raise CheckpointError(f"no readable checkpoint in {path}: {listed}")
