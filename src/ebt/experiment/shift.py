"""`ebt experiment thinking-shift`: do thinking gains grow with distance from training?

The paper's OOD figure: for several datasets, the perplexity improvement from thinking longer
(1 step -> the most steps) and from thinking longer plus self-verification (the most steps,
best of the most samples), against how far each set is from the training data. Distance is
measured as the paper does, a perplexity ratio: the set's perplexity over the validation
perplexity (of the Transformer++ run given with --baseline, else of the EBT itself at one
step). The baseline cannot think, so its gain is 0 everywhere: the flat line.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from ebt.api import load_run
from ebt.data import build_token_dataset, iter_eval_batches
from ebt.errors import EbtError
from ebt.plots import pyplot, save_figure
from ebt.thinking.metrics import LOSS_CAP, perplexity
from ebt.thinking.selection import Selection, thinking_curves

DEFAULT_SETS = ("val", "pydoc")
PROBE_SETS = ("dyck", "arithmetic")


def default_sets() -> list[str]:
    """Validation, the pydoc prose and the reasoning probes where this install has them."""
    probes = importlib.util.find_spec("ebt.data.probes") is not None
    return list(DEFAULT_SETS) + (list(PROBE_SETS) if probes else [])


def _batches(run: Any, name: str, count: int) -> list:
    data = run.config.data
    if name == "val":
        dataset = build_token_dataset(data, run.tokenizer, "val")
    else:
        source = data.ood_source if name == "ood" else name
        dataset = build_token_dataset(data, run.tokenizer, "all", source=source)
    return list(iter_eval_batches(dataset, run.config.train.batch_size, count))


def _gain(before: float, after: float) -> float:
    """Percentage perplexity improvement from `before` to `after` (positive: better), in log
    space so that the huge losses of an untrained model do not overflow."""
    return -math.expm1(after - before) * 100.0 if after - before < LOSS_CAP else -math.inf


def _curves(run: Any, batches: list, steps: list[int], samples: list[int]) -> dict[str, Any]:
    think = run.config.think  # best-of-N by the run's rule (think.selection)
    selection = Selection(think.selection, think.selection_temperature)
    result = thinking_curves(
        run.model, batches, steps, samples, run.tokenizer.pad_id, selection=selection
    )
    return {(point["steps"], point["samples"]): point for point in result["curves"]}


def trained_steps(think: Any) -> int:
    """Steps per landscape the run was trained for and `ebt eval` takes (last landscape)."""
    return think.random_steps + 1 if think.random_steps else think.steps


def _set_row(name: str, points: dict, start: int, steps: list[int], samples: list[int]) -> dict:
    base = points[(start, 1)]["loss"]
    longer = points[(max(steps), 1)]["loss"]
    verified = points[(max(steps), max(samples))]["loss"]
    return {
        "set": name,
        "loss_start": base,
        "loss_longer": longer,
        "loss_verified": verified,
        "gain_longer_pct": _gain(base, longer),
        "gain_verified_pct": _gain(base, verified),
        "curves": list(points.values()),
    }


def thinking_shift(
    run_path: str,
    sets: list[str],
    steps: list[int],
    samples: list[int],
    batches: int,
    baseline: str = "",
    plot: str = "",
    from_steps: int = 0,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Thinking gains (from `from_steps`, default the trained steps) and distance for every
    set; writes the plot when asked."""
    verb = "ebt experiment thinking-shift"
    run = load_run(run_path, overrides or [], modality="text", verb=verb)
    if run.config.model.kind != "ebt":
        raise EbtError(f"{run_path}: thinking-shift needs a text EBT run")
    reference = load_run(baseline) if baseline else None
    start = from_steps or trained_steps(run.config.think)
    steps = sorted({*steps, start})
    samples = sorted({*samples, 1})
    rows = []
    for name in sets or default_sets():
        data = _batches(run, name, batches)
        row = _set_row(name, _curves(run, data, steps, samples), start, steps, samples)
        if reference is not None:
            row["baseline_loss"] = _curves(reference, data, [1], [1])[(1, 1)]["loss"]
        rows.append(row)
    _add_distance(rows, "baseline_loss" if reference is not None else "loss_start")
    result = {"run": run_path, "baseline": baseline, "steps": steps, "samples": samples}
    think = run.config.think
    result |= {"from_steps": start, "selection": think.selection}
    result["sets"] = rows
    if plot:
        plot_shift(result, plot)  # atomic
        result["plot"] = str(plot)
    return result


def _add_distance(rows: list[dict[str, Any]], key: str) -> None:
    """distance = perplexity of each set / perplexity of the first set (validation)."""
    reference = rows[0][key]
    for row in rows:
        row["distance"] = perplexity(row[key] - reference)
        row["distance_measured_by"] = "baseline" if key == "baseline_loss" else "ebt, trained steps"


def plot_shift(result: dict[str, Any], path: Path) -> Path:
    """Gain against distance: thinking longer, longer + verification, the baseline at 0."""
    plt = pyplot()

    rows = sorted(result["sets"], key=lambda row: row["distance"])
    distance = [row["distance"] for row in rows]
    figure, axes = plt.subplots(figsize=(6, 4))
    start, most = result["from_steps"], max(result["steps"])
    longer = [row["gain_longer_pct"] for row in rows]
    axes.plot(distance, longer, "o-", label=f"EBT, {start} -> {most} steps")
    verified = [row["gain_verified_pct"] for row in rows]
    rule = result.get("selection", "lowest")
    label = f"EBT, {start} -> {most} steps, best of {max(result['samples'])}, {rule}"
    axes.plot(distance, verified, "s-", label=label)
    axes.axhline(0.0, color="grey", linestyle="--", label="Transformer++ (cannot think)")
    for row in rows:
        axes.annotate(row["set"], (row["distance"], row["gain_verified_pct"]), fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("distance from training (perplexity ratio to validation, log scale)")
    axes.set_ylabel("perplexity improvement (%)")
    axes.set_title("thinking gains against distribution shift")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)
