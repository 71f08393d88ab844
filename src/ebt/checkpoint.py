"""Run-directory checkpoints: atomic, pruned, and loadable without unpickling code.

Layout (the user-facing contract)::

    RUN/step_NNNNNN/model.safetensors   model weights (safetensors)
    RUN/step_NNNNNN/config.json         the resolved config (JSON, sorted keys)
    RUN/step_NNNNNN/train_state.pt      optimizer, scheduler, step, RNG states, caller's `extra`
    RUN/latest                          text file naming the newest step directory

A checkpoint is written into `RUN/.tmp-step_NNNNNN-<pid>/`, its files fsynced, the directory
renamed into place with `os.replace`, and only then is `latest` rewritten (also via a temporary
file and `os.replace`). A crash at any point therefore leaves `latest` naming a complete
checkpoint; leftover `.tmp-*` directories are never picked up. `train_state.pt` holds only
tensors and plain Python containers/scalars, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ebt.optim import unwrap

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"
LATEST_FILE = "latest"
STEP_PREFIX = "step_"
_FILES = (MODEL_FILE, CONFIG_FILE, TRAIN_STATE_FILE)
_PLAIN = (int, float, str, bool, type(None), torch.dtype, torch.device)


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


def _fsync_path(path: Path) -> None:
    """Flush a file's (or, where the OS allows it, a directory's) contents to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and `os.replace`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def write_run_config(run_dir: str | Path, config_dict: dict[str, Any]) -> Path:
    """Atomically write `RUN/config.json` (the resolved config); only rank 0 writes."""
    path = Path(run_dir) / CONFIG_FILE
    if _is_writer():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(path, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return path


def _plain(value: Any, where: str) -> Any:
    """`value` made safe for `weights_only` loading: numpy -> torch/Python, else TypeError."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping):
        return {key: _plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"{where} is a {type(value).__name__}; train_state.pt may hold only tensors, dicts, "
        "lists, tuples, int, float, str, bool and None (it loads with weights_only=True)"
    )


def rng_state() -> dict[str, Any]:
    """Torch CPU, CUDA (if available), Python `random` and NumPy global RNG states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": (version, tuple(internal), gauss),
        "numpy": (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ),
    }


def restore_rng(train_state: Mapping[str, Any]) -> None:
    """Restore the RNG states saved in `train_state["rng"]` (missing parts are skipped)."""
    rng = train_state.get("rng") or {}
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda")
    if cuda and torch.cuda.is_available():
        count = min(len(cuda), torch.cuda.device_count())
        for device, state in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(state, device)
    if rng.get("python") is not None:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
    if rng.get("numpy") is not None:
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _model_tensors(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies of the weights (safetensors rejects shared storage)."""
    state = model if isinstance(model, Mapping) else unwrap(model).state_dict()
    return {
        name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state.items()
    }


def _state_of(thing: Any) -> Any:
    """`thing.state_dict()` for optimizers/schedulers; state dicts and None pass through."""
    return thing.state_dict() if hasattr(thing, "state_dict") else thing


def _write_step_files(
    tmp: Path,
    step: int,
    model: Any,
    config_dict: dict[str, Any],
    optimizer: Any,
    scheduler: Any,
    extra: dict | None,
) -> None:
    """Write and fsync the three checkpoint files into the temporary directory `tmp`."""
    state = {
        "step": int(step),
        "optimizer": _state_of(optimizer),
        "scheduler": _state_of(scheduler),
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    state = _plain(state, "train_state")  # fails before anything big is written
    config_text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"
    save_file(_model_tensors(model), str(tmp / MODEL_FILE), metadata={"step": str(step)})
    _fsync_path(tmp / MODEL_FILE)
    with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as handle:
        handle.write(config_text)
        handle.flush()
        os.fsync(handle.fileno())
    with open(tmp / TRAIN_STATE_FILE, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_path(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (same step saved again) is replaced."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(final.parent)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module | Mapping[str, torch.Tensor],
    config_dict: dict[str, Any],
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None,
    scheduler: Any,
    extra: dict | None = None,
    keep: int = 2,
) -> Path:
    """Atomically write `RUN/step_NNNNNN/`, point `RUN/latest` at it, prune to `keep` checkpoints.

    `model` may be a module (DDP / torch.compile wrappers are unwrapped) or a ready state dict;
    `optimizer` / `scheduler` may be objects, ready state dicts, or None. `extra` is any dict of
    tensors and plain Python values (NumPy arrays become tensors, NumPy scalars Python numbers).
    Under torch.distributed only rank 0 writes; other ranks return the path at once, so the
    caller must `barrier()` afterwards before anyone reads the checkpoint. With FSDP, gather full
    state dicts on every rank first and pass them in. `keep <= 0` keeps every checkpoint.
    """
    run = Path(run_dir)
    final = run / step_dir_name(step)
    if not _is_writer():
        return final
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_step_files(tmp, step, model, config_dict, optimizer, scheduler, extra)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(run / LATEST_FILE, final.name + "\n")
    prune_checkpoints(run, keep, current=final)
    return final


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


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run dir (via `latest`), or the step dir given.

    If `latest` is missing or names something incomplete, the highest complete `step_*`
    directory is used instead; None when the run has no checkpoint.
    """
    path = Path(run_dir)
    if (path / MODEL_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        named = path / latest.read_text(encoding="utf-8").strip()
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


def load_model_state(
    step_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, config_dict) of a checkpoint (a step dir or a run dir), safetensors only."""
    resolved = resolve_checkpoint(step_dir)
    state = load_file(str(resolved / MODEL_FILE), device=str(device))
    config_path = resolved / CONFIG_FILE
    if not config_path.is_file():
        config_path = resolved.parent / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {resolved} or {resolved.parent}")
    return state, json.loads(config_path.read_text(encoding="utf-8"))


def load_train_state(
    step_dir: str | Path, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """The `train_state.pt` dict (step, optimizer, scheduler, rng, extra); weights_only=True."""
    path = resolve_checkpoint(step_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {TRAIN_STATE_FILE} in {path.parent}")
    return torch.load(path, map_location=map_location, weights_only=True)
