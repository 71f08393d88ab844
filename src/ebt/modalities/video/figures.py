"""Pictures of a video rollout: a strip image and a GIF (truth / EBT / baseline, one row or
panel per model) and the final energy of every predicted frame over time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ebt.data.images import to_uint8
from ebt.outputs import atomic_path
from ebt.plots import pyplot, save_figure

GAP = 2  # pixels between frames / panels
SCALE = 4  # nearest-neighbour upscaling of the (tiny) frames


def _pixels(frames: torch.Tensor) -> np.ndarray:
    """Frames (T, 3, S, S) in [-1, 1] as uint8 (T, S * SCALE, S * SCALE, 3)."""
    array = to_uint8(frames).permute(0, 2, 3, 1).numpy()  # (T, S, S, 3)
    return array.repeat(SCALE, axis=1).repeat(SCALE, axis=2)


def _side_by_side(panels: list[np.ndarray], axis: int) -> np.ndarray:
    """Panels (..., h, w, 3) joined along `axis` (-3 rows, -2 columns) with white gaps."""
    shape = list(panels[0].shape)
    shape[axis] = GAP
    gap = np.full(shape, 255, dtype=np.uint8)
    pieces = [piece for panel in panels for piece in (panel, gap)][:-1]
    return np.concatenate(pieces, axis=axis)


def write_strip(rows: dict[str, torch.Tensor], context: int, path: str | Path) -> Path:
    """A PNG of one clip: a labelled row per model (frames (T, 3, S, S): the context, then the
    predictions), the first `context` columns being the real frames every model saw."""
    plt = pyplot()

    strips = [_side_by_side(list(_pixels(frames)), axis=-2) for frames in rows.values()]
    height, width = strips[0].shape[:2]
    size = (width / 100 + 0.6, len(rows) * (height / 100 + 0.25) + 0.3)  # inches
    figure, axes = plt.subplots(len(rows), 1, figsize=size)
    for axis, name, strip in zip(np.atleast_1d(axes), rows, strips, strict=True):
        axis.imshow(strip, interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(name, fontsize=8)
    predicted = next(iter(rows.values())).shape[0] - context
    np.atleast_1d(axes)[0].set_title(
        f"{context} context frames, then {predicted} predicted (each from the ones before)",
        fontsize=8,
    )
    figure.tight_layout()
    return save_figure(figure, path)


def write_gif(rows: dict[str, torch.Tensor], path: str | Path, milliseconds: int = 250) -> Path:
    """An animated GIF of one clip: the models' frames (T, 3, S, S) side by side, in the
    order of `rows` (truth first), looping."""
    import imageio.v3 as iio

    frames = _side_by_side([_pixels(frames) for frames in rows.values()], axis=-2)  # (T, h, w, 3)
    with atomic_path(path) as temporary:
        iio.imwrite(temporary, frames, extension=".gif", duration=milliseconds, loop=0)
    return Path(path)


def plot_energy(report: dict, path: str | Path, energies: torch.Tensor | None = None) -> Path:
    """Left: the EBT's final energy of every predicted frame over time (mean over clips, thin
    lines per clip from `energies` (B, H)); right: PSNR per horizon of every model."""
    plt = pyplot()

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    thinking = {name: r for name, r in report["models"].items() if "energy" in r}
    for name, result in thinking.items():
        horizons = range(1, len(result["energy"]) + 1)
        left.plot(horizons, result["energy"], marker="o", label=f"{name} (mean)")
    if energies is not None:
        for row in energies.double().numpy():
            left.plot(range(1, len(row) + 1), row, color="gray", alpha=0.3, linewidth=0.8)
    left.set_xlabel("predicted frame (horizon)")
    left.set_ylabel("final energy")
    left.set_title("uncertainty over time: final energy per frame", fontsize=9)
    for name, result in report["models"].items():
        psnr = result["all"]["psnr"]
        right.plot(range(1, len(psnr) + 1), psnr, marker=".", label=name)
    right.set_xlabel("predicted frame (horizon)")
    right.set_ylabel("PSNR (dB)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)
