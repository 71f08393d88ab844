"""Run-directory ownership and truthful resume.

One owner per run directory: `RunLock` takes an exclusive `flock` on `RUN/.lock`. The kernel
releases it when the process ends in any way (SIGKILL included), so a lock is never stale; the
file's text only names the holder for the error message. Reading commands (eval, think,
generate) never take it.

Resuming compares the new resolved config with the config the checkpoint was trained with.
Keys in `RESUMABLE_KEYS` may change (they are applied for real and recorded as a `resume` row
in metrics.jsonl); every other key is fixed for the life of a run (model shape, tokenizer, data,
thinking recipe, seed, batch size) and a difference is refused in one line.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ebt import checkpoint
from ebt.config import ConfigError
from ebt.errors import MachineError, RunBusyError
from ebt.outputs import atomic_path
from ebt.training.distributed import DistributedContext, on_main

LOCK_FILE = ".lock"
RUNTIME_FILE = "runtime.json"

# Keys a resumed run may change. Learning rates, schedule and optimiser hyper-parameters are
# written into the restored optimizer and scheduler (optim.apply_hyperparameters); the rest is
# cadence, logging and how the same computation runs. Everything else is fixed.
RESUMABLE_KEYS = frozenset(
    {
        "think.samples",
        "think.selection",  # inference-only: how best-of-N picks
        "think.selection_temperature",
        "think.step_size_lr_multiplier",
        "data.ood_source",
        "data.ood_noise_level",
        "data.cache_dir",  # where encoded video frames are cached: content-addressed
        *(
            f"train.{key}"
            for key in (
                "max_steps",
                "lr",
                "min_lr_ratio",
                "warmup_steps",
                "schedule_steps",
                "weight_decay",
                "beta1",
                "beta2",
                "grad_clip",
                "grad_accum",
                "eval_every",
                "eval_batches",
                "log_every",
                "save_every",
                "keep_checkpoints",
                "out_dir",
                "device",
                "precision",
                "tf32",
                "num_threads",
                "progress",
                "tensorboard",
                "wandb",
                "wandb_project",
                "parallel",
                "activation_checkpointing",
                "compile",
                "cuda_graphs",
            )
        ),
    }
)


def flatten_config(config: dict[str, Any]) -> dict[str, Any]:
    """{"section.key": value} of a nested config dict."""
    return {
        f"{section}.{key}": value
        for section, entries in config.items()
        if isinstance(entries, dict)
        for key, value in entries.items()
    }


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """{"section.key": [old, new]} for every key whose value differs (missing -> None)."""
    before, after = flatten_config(old), flatten_config(new)
    return {
        key: [before.get(key), after.get(key)]
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    }


def check_resumable(run_dir: Path, changes: dict[str, list[Any]]) -> None:
    """Refuse, in one line, changes to keys that are fixed for the life of a run."""
    fixed = {key: values for key, values in changes.items() if key not in RESUMABLE_KEYS}
    if not fixed:
        return
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in fixed.items())
    raise ConfigError(
        f"cannot resume {run_dir} with a different {listed}: these keys are fixed for the life "
        "of a run; drop the overrides, or train into a new train.out_dir"
    )


def write_runtime(run_dir: Path, record: dict[str, Any]) -> Path:
    """RUN/runtime.json: how the latest `ebt train` of the run computes (device, the precision
    train.precision resolved to, TF32), rewritten by each start or resume."""
    path = Path(run_dir) / RUNTIME_FILE
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def resume_row(step: int, changes: dict[str, list[Any]]) -> dict[str, Any]:
    """The metrics.jsonl row that records a resume and what it changed."""
    return {"event": "resume", "step": step, "changes": changes}


class RunLock:
    """An exclusive, kernel-released lock on a run directory (`with RunLock(path): ...`)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._handle = None

    def acquire(self) -> None:
        """Take the lock or raise RunBusyError naming the process that holds it."""
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise RunBusyError(self._busy_message(holder)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_holder()) + "\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Give the lock back (closing the file releases the flock)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove_if_alone(self) -> None:
        """Delete the lock file and the run directory if nothing else was written into it (a
        run that failed before its first write leaves no empty directory behind)."""
        if self._handle is not None and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            self.run_dir.rmdir()

    def _busy_message(self, holder_text: str) -> str:
        try:
            holder = json.loads(holder_text)
            who = (
                f"process {holder['pid']} on {holder['host']} "
                f"(started {holder['started']}: {holder['command']})"
            )
        except (ValueError, KeyError, TypeError):
            who = "another process"
        return (
            f"{self.run_dir} is in use by {who}; wait for it to finish or stop it, "
            "or train into another train.out_dir"
        )

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _short_command(argv: list[str], width: int = 200) -> str:
    """The command line, whole arguments only: those that fit in `width` characters, then how
    many more there are (a path is never cut in the middle)."""
    kept = argv[:1]
    for argument in argv[1:]:
        if len(" ".join([*kept, argument])) > width:
            return " ".join(kept) + f" ... (+{len(argv) - len(kept)} more arguments)"
        kept.append(argument)
    return " ".join(kept)


def _holder() -> dict[str, Any]:
    """Who holds the lock, for the message a second process prints."""
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = _short_command([Path(sys.argv[0]).name, *sys.argv[1:]])
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": started,
        "command": command,
    }


def intact_note(run_dir: Path) -> str:
    """What survives a failed write: the newest complete checkpoint and how to resume from it."""
    complete = checkpoint.step_dirs(run_dir)
    if not complete:
        return "no complete checkpoint yet: running the command again starts over"
    return f"intact: {complete[-1]} (resume: ebt train {run_dir / 'config.json'})"


def check_space(run_dir: Path, step: int) -> None:
    """Before writing checkpoint `step`: the newest complete checkpoint's size against the free
    space, so a run near a full disk stops at a step boundary instead of failing mid-write."""
    complete = checkpoint.step_dirs(run_dir)
    if not complete:
        return
    needed = sum(path.stat().st_size for path in complete[-1].iterdir() if path.is_file())
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise MachineError(
            f"not enough space for the step-{step} checkpoint in {run_dir}: {free / 2**20:.1f} "
            f"MiB free, the last one took {needed / 2**20:.1f} MiB; stopped before writing it; "
            + intact_note(run_dir)
        )


@contextlib.contextmanager
def own_run(run_dir: Path, context: DistributedContext) -> Iterator[None]:
    """Hold the run directory's lock for the whole job: rank 0 takes it for all ranks, and
    every rank raises the same RunBusyError when another job holds it."""
    lock, created = RunLock(run_dir), not run_dir.exists()
    on_main(lock.acquire)  # RunBusyError, a read-only out_dir: the same line on every rank
    try:
        yield
    except BaseException:
        if created and context.is_main:  # failed before writing anything: leave no trace
            lock.remove_if_alone()
        raise
    finally:
        lock.release()
