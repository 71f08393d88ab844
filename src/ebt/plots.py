"""Figures people would rather look at than read: thinking curves, energy vs loss."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from ebt.outputs import atomic_path


@functools.cache
def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, imported on first use (matplotlib costs
    start-up time every command would pay otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure as a PNG (120 dpi; parent folders made; atomically) and close
    it."""
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=dpi)
    finally:
        pyplot().close(figure)
    return Path(path)


def plot_thinking(result: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Left: loss per thinking steps, one line per best-of-N; right: energy vs token loss."""
    figure, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    fixed = [c for c in result["curves"] if not c.get("adaptive")]
    adaptive = [c for c in result["curves"] if c.get("adaptive")]
    if adaptive:
        left.plot(
            [c["steps"] for c in adaptive],
            [c["loss"] for c in adaptive],
            marker="s",
            linestyle="--",
            label=f"adaptive (tol {adaptive[0]['tolerance']:g})",
        )
    for samples in sorted({c["samples"] for c in fixed}):
        points = [c for c in fixed if c["samples"] == samples]
        steps = [c["steps"] for c in points]
        left.plot(steps, [c["loss"] for c in points], marker="o", label=f"best of {samples}")
    for c in result["curves"]:
        label = f"{c['forward_passes_per_token']:.3g}"
        offset = (0, -12) if c.get("adaptive") else (0, 6)
        left.annotate(
            label,
            (c["steps"], c["loss"]),
            textcoords="offset points",
            xytext=offset,
            fontsize=7,
            ha="center",
        )
    left.set_xscale("log", base=2)
    left.set_xlabel("thinking steps per landscape (labels: energy evaluations per token)")
    left.set_ylabel("validation loss (nats / token)")
    left.legend()
    left.grid(alpha=0.3)
    tokens = result.get("tokens")
    if tokens and tokens.get("energy") is not None:
        keep = ~tokens["loss"].isnan()
        energy, loss = tokens["energy"][keep][:5000], tokens["loss"][keep][:5000]
        right.scatter(energy.numpy(), loss.numpy(), s=3, alpha=0.3)
        auroc = result.get("uncertainty", {}).get("energy_auroc_wrong", float("nan"))
        right.set_title(
            f"final energy vs token loss (AUROC for wrong top-1: {auroc:.3f})", fontsize=9
        )
        right.set_xlabel("final energy")
        right.set_ylabel("token loss")
    else:
        right.text(0.5, 0.5, "no energies (Transformer++)", ha="center", va="center")
        right.set_axis_off()
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)
