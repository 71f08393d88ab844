"""Metrics logging: `RUN/metrics.jsonl` always, TensorBoard and Weights & Biases optionally.

Every `log(row)` appends one JSON object per line to `metrics.jsonl` and flushes it. Rows carry
whatever keys the caller passes: training rows at least `step` and `loss`, evaluation rows a
`split` name. Tensors and NumPy values are turned into plain numbers (or lists) first.
TensorBoard and W&B are imported only when asked for; W&B takes its credentials and mode from
the environment only (`WANDB_API_KEY`, `WANDB_MODE`, ...), never from files written here.
"""

from __future__ import annotations

import json
import math
import numbers
import sys
from pathlib import Path
from typing import Any

import torch

from ebt.errors import MachineError, machine_cause
from ebt.outputs import write_bytes, write_text

METRICS_FILE = "metrics.jsonl"
_INSTALL_HINT = "install the tracking extras: pip install 'ebt[tracking]'"


def to_plain(value: Any) -> Any:
    """A JSON-friendly copy: tensors/NumPy -> Python numbers or lists; containers recursed."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and hasattr(value, "dtype"):  # NumPy scalars and 0-d arrays
        return value.item() if getattr(value, "size", 1) == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(item) for item in value]
    return value


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a row, keyed `split/name` for evaluation rows, without `step`."""
    prefix = f"{row['split']}/" if isinstance(row.get("split"), str) else ""
    return {
        prefix + key: float(value)
        for key, value in row.items()
        if key not in ("step", "split")
        and isinstance(value, numbers.Real)
        and not isinstance(value, bool)
    }


class MetricsLogger:
    """Appends rows to `RUN/metrics.jsonl`; optionally mirrors scalars to TensorBoard / W&B.

    `enabled=False` (non-zero ranks) makes every method a no-op and creates no files.
    """

    def __init__(
        self,
        run_dir: str | Path,
        config_dict: dict[str, Any] | None = None,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "ebt",
        enabled: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self._file = None
        self._tensorboard = None
        self._wandb = None
        self._count = 0
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = to_plain(config_dict or {})
        if tensorboard:
            self._tensorboard = _open_tensorboard(self.run_dir, config)
        if wandb:
            self._wandb = _open_wandb(self.run_dir, config, wandb_project)
        repair_metrics(self.path)  # a torn last line would swallow the next row
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()

    def log(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append `row` (converted to plain values) and forward its scalars; returns the row."""
        plain = to_plain(row)
        if not self.enabled or self._file is None:
            return plain
        try:
            self._file.write(json.dumps(plain) + "\n")
            self._file.flush()
        except OSError as error:  # a full disk: one line; the rows before it are whole
            cause = machine_cause(error)
            if cause is None:
                raise
            self.close()  # never append after a torn row (repaired when the run resumes)
            raise MachineError(f"cannot append to {self.path}: {cause}") from error
        step = plain.get("step", self._count)
        step = int(step) if isinstance(step, numbers.Real) else self._count
        self._count += 1
        scalars = _scalars(plain)
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)
        return plain

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _open_tensorboard(run_dir: Path, config: dict[str, Any]) -> Any:
    """A SummaryWriter writing to `RUN/tensorboard/`, with the config as a text entry."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            f"TensorBoard logging needs the tensorboard package; {_INSTALL_HINT}"
        ) from error
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```")
    return writer


def _open_wandb(run_dir: Path, config: dict[str, Any], project: str) -> Any:
    """A W&B run; login and mode come from the environment (WANDB_API_KEY, WANDB_MODE)."""
    try:
        import wandb
    except ImportError as error:
        raise ImportError(
            f"Weights & Biases logging needs the wandb package; {_INSTALL_HINT}"
        ) from error
    return wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All readable rows of `RUN/metrics.jsonl` (or of the .jsonl file given), in order.

    An unreadable line (a torn last line from a crash or a full disk, or damage elsewhere) is
    skipped and counted: one warning on stderr names the file and the count.
    """
    rows, skipped, path = read_metrics_counted(run_dir)
    if skipped:
        print(f"ebt: warning: {path}: skipped {skipped} unreadable line(s)", file=sys.stderr)
    return rows


def read_metrics_counted(run_dir: str | Path) -> tuple[list[dict[str, Any]], int, Path]:
    """(the readable rows, how many lines were not, the file read); no file: ([], 0, path)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return [], 0, path
    rows, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped, path


def repair_metrics(path: Path) -> Path | None:
    """Before anything is appended: a last line without its newline (a crash or a full disk
    mid-write) is completed when it is a whole row, else moved aside to `metrics.jsonl.torn`
    (kept for inspection; `.torn-2`, ... if taken) with a note on stderr. Returns that file."""
    data = path.read_bytes() if path.is_file() else b""
    if not data or data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    with open(path, "r+b") as handle:
        if _is_row(tail):
            handle.seek(len(data))
            handle.write(b"\n")  # the row was whole: only its newline was lost
            return None
        handle.truncate(cut)
    aside, number = path.with_name(f"{path.name}.torn"), 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.name}.torn-{number}")
    write_bytes(aside, tail)
    print(
        f"ebt: warning: {path} ended in a torn line ({len(tail)} bytes: a crash or a full disk "
        f"mid-write); moved it aside to {aside}",
        file=sys.stderr,
    )
    return aside


def _is_row(text: bytes) -> bool:
    try:
        return isinstance(json.loads(text.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def truncate_metrics(run_dir: str | Path, after_step: int) -> int:
    """Drop rows with `step > after_step`; returns how many went.

    Call it when resuming from a checkpoint at `after_step`, before opening a MetricsLogger, so
    steps logged after that checkpoint by the interrupted run are not duplicated.
    """
    path = Path(run_dir) / METRICS_FILE
    rows = read_metrics(run_dir)
    kept = [row for row in rows if not _step_after(row, after_step)]
    if len(kept) != len(rows):
        write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
    return len(rows) - len(kept)


def _step_after(row: dict[str, Any], step: int) -> bool:
    value = row.get("step")
    return isinstance(value, numbers.Real) and value > step


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        if math.isfinite(value) and value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def format_row(row: dict[str, Any]) -> str:
    """A one-line console summary: `split` and `step` first, then the other keys in order."""
    plain = to_plain(row)
    head = [str(plain["split"])] if "split" in plain else []
    if "step" in plain:
        head.append(f"step {plain['step']}")
    rest = [
        f"{key} {_format_value(value)}"
        for key, value in plain.items()
        if key not in ("split", "step") and not isinstance(value, dict | list)
    ]
    return " | ".join(head + rest)
