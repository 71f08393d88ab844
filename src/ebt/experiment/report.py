"""A scaling study's fits, plots and `report.md`.

For each model the metric is fitted against the axis (fit.py) and, separately, against the
counted training FLOPs; the paper's scaling-rate gain of the EBT over the baseline is reported
with its bootstrap interval. Plots: metric against the axis and against FLOPs, log-log, points
and fitted lines per model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ebt.experiment.fit import fit_power_law, rate_gain
from ebt.outputs import write_text
from ebt.plots import pyplot, save_figure

AXIS_LABELS = {
    "data": "training tokens (text) / examples",
    "steps": "optimiser steps",
    "batch": "batch size",
    "depth": "blocks",
    "width": "model width",
    "params": "non-embedding parameters",
}


def _series(results: dict[str, Any], model: str, x_key: str) -> tuple[list[float], list[float]]:
    rows = sorted(
        (row for row in results["points"].values() if row["model"] == model),
        key=lambda row: row[x_key],
    )
    return [float(row[x_key]) for row in rows], [row["metric"] for row in rows]


def fits(results: dict[str, Any], x_key: str = "x") -> dict[str, Any]:
    """Per model its power law (when it has two or more points) and, with both models, the
    rate gain; `x_key` "x" (the axis) or "flops"."""
    fitted: dict[str, Any] = {}
    for model in results["study"]["models"]:
        x, y = _series(results, model, x_key)
        if len(set(x)) >= 2:
            law = fit_power_law(x, y)
            fitted[model] = {
                "slope": law.slope,
                "slope_interval": [law.slope_low, law.slope_high],
                "coefficient": law.coefficient,
                "r_squared": law.r_squared,
            }
    if "ebt" in fitted and "baseline" in fitted:
        fitted["rate_gain"] = rate_gain(
            _series(results, "ebt", x_key), _series(results, "baseline", x_key)
        )
    return fitted


PLOT_CAP = 1e100  # log-axis values above this are drawn at it, as "off the scale" markers


def shown_on_log_axis(values: list[float]) -> tuple[list[float], list[bool]]:
    """`values` capped at PLOT_CAP, and which were capped. A barely trained point's perplexity
    reaches e^700 (ebt.thinking.metrics.LOSS_CAP): matplotlib's log axis cannot span that (its
    ticks overflow float64 and the axis comes out empty)."""
    return [min(value, PLOT_CAP) for value in values], [value > PLOT_CAP for value in values]


def plot_scaling(results: dict[str, Any], x_key: str, path: Path) -> Path:
    """Log-log metric against `x_key` per model, with the fitted power laws."""
    plt = pyplot()
    import numpy as np

    study = results["study"]
    fitted = fits(results, x_key)
    figure, axes = plt.subplots(figsize=(6, 4))
    for model, marker in zip(study["models"], ("o", "s"), strict=False):
        x, metric = _series(results, model, x_key)
        y, capped = shown_on_log_axis(metric)
        label = "EBT" if model == "ebt" else "baseline"
        if model in fitted:
            slope = fitted[model]["slope"]
            grid = np.geomspace(min(x), max(x), 50)
            with np.errstate(over="ignore"):
                line = np.minimum(fitted[model]["coefficient"] * grid**slope, PLOT_CAP)
            axes.plot(grid, line, alpha=0.6, label=f"{label} fit, slope {slope:.3f}")
        axes.scatter(x, y, marker=marker, label=label)
        if any(capped):
            over = [(xi, yi) for xi, yi, cut in zip(x, y, capped, strict=True) if cut]
            axes.scatter(
                *zip(*over, strict=True),
                marker="^",
                s=80,
                facecolors="none",
                edgecolors="red",
                label=f"{label}: above {PLOT_CAP:.0e}, drawn at it",
            )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("training FLOPs (counted)" if x_key == "flops" else AXIS_LABELS[study["axis"]])
    axes.set_ylabel(study["metric"])
    axes.set_title(f"{study['axis']} scaling: {study['metric']}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def _interval(values: list[float]) -> str:
    return f"[{values[0]:.3f}, {values[1]:.3f}]"


def _fit_lines(fitted: dict[str, Any], against: str) -> list[str]:
    lines = [f"| model | slope against {against} | 95% interval | R² |", "|---|---|---|---|"]
    for model in ("ebt", "baseline"):
        if model in fitted:
            fit = fitted[model]
            interval, r2 = _interval(fit["slope_interval"]), fit["r_squared"]
            lines.append(f"| {model} | {fit['slope']:.4f} | {interval} | {r2:.3f} |")
    if "rate_gain" in fitted:
        gain = fitted["rate_gain"]
        lines += [
            "",
            f"Scaling-rate gain |slope EBT| / |slope baseline| - 1 against {against}: "
            f"**{gain['gain'] * 100:.1f}%** (95% bootstrap interval "
            f"{gain['low'] * 100:.1f}% to {gain['high'] * 100:.1f}%).",
        ]
    return lines


def _point_lines(results: dict[str, Any]) -> list[str]:
    metric = results["study"]["metric"]
    lines = [
        f"| run | x | {metric} | steps | batch | non-embedding params | FLOPs | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(results["points"].values(), key=lambda row: (row["model"], row["x"]))
    for row in rows:
        lines.append(
            f"| {row['name'] if 'name' in row else row['model']} | {row['x']:.4g} | "
            f"{row['metric']:.4f} | {row['max_steps']} | {row['batch_size']} | "
            f"{row['non_embedding_parameters']:,} | {row['flops']:.3g} | "
            f"{row.get('seconds', 0):.0f} |"
        )
    return lines


def write_report(study: Any, results: dict[str, Any]) -> Path:
    """report.md and the two plots in the study's directory; the fits go into results."""
    out = Path(study.out_dir)
    results["fits"] = {"axis": fits(results, "x"), "flops": fits(results, "flops")}
    axis_plot = plot_scaling(results, "x", out / f"scaling-{study.axis}.png")
    flops_plot = plot_scaling(results, "flops", out / f"scaling-{study.axis}-flops.png")
    overrides = " ".join(study.overrides)
    lines = [
        f"# Scaling study: {study.axis}",
        "",
        f"`ebt experiment scaling {study.config} --axis {study.axis} --values "
        f"{','.join(study.values)} --models {','.join(study.models)} {overrides}`".replace(
            "  ", " "
        ),
        "",
        f"Metric: final validation `{study.metric}` of each run. FLOPs: counted training FLOPs"
        " (matmuls, convolutions and attention of forward and backward, "
        "`torch.utils.flop_counter`), per step times steps.",
        "",
        f"![{study.axis}]({axis_plot.name})",
        "",
        *_fit_lines(results["fits"]["axis"], study.axis),
        "",
        f"![FLOPs]({flops_plot.name})",
        "",
        *_fit_lines(results["fits"]["flops"], "FLOPs"),
        "",
        "## Points",
        "",
        *_point_lines(results),
        "",
    ]
    return write_text(out / "report.md", "\n".join(lines))
