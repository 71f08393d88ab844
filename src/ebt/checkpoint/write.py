"""Writing checkpoints atomically (temporary directory, fsync, rename, then `latest`)."""

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
from safetensors.torch import save_file
from torch import nn

from ebt.checkpoint.layout import (
    CONFIG_FILE,
    LATEST_FILE,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    _is_writer,
    prune_checkpoints,
    step_dir_name,
)
from ebt.errors import MachineError, machine_cause
from ebt.nn.wrappers import unwrap
from ebt.outputs import fsync_path, write_text

_PLAIN = (int, float, str, bool, type(None), torch.dtype, torch.device)


def write_run_config(run_dir: str | Path, config_dict: dict[str, Any]) -> Path:
    """Atomically write `RUN/config.json` (the resolved config); only rank 0 writes."""
    path = Path(run_dir) / CONFIG_FILE
    if _is_writer():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
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
    fsync_path(tmp / MODEL_FILE)
    with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as handle:
        handle.write(config_text)
        handle.flush()
        os.fsync(handle.fileno())
    with open(tmp / TRAIN_STATE_FILE, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_path(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (same step saved again) is replaced."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)


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
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        cause = machine_cause(error)
        if cause is None:
            raise
        raise MachineError(f"could not write the checkpoint {final}: {cause}") from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text(run / LATEST_FILE, final.name + "\n")
    prune_checkpoints(run, keep, current=final)
    return final
