"""`ebt report RUN [RUN ...] -o report.md`: one markdown page for a run, or comparing runs.

The page holds the training curves read from each run's `metrics.jsonl` (loss with its first
and last thinking step, the energy gap, learning rates, the step size, validation loss per
thinking step), the last evaluation of every split, what the model does (text: a short
generated sample; images: a denoising grid at the training noise level), and each run's
config (for several runs: the keys that differ, then each in full). Plots are PNG files beside
the report, named after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ebt.api import load_run
from ebt.errors import EbtError
from ebt.modalities.image import denoise
from ebt.modalities.text.generate import Sampling, generate
from ebt.modalities.video.figures import write_strip
from ebt.modalities.video.rollout_report import RolloutRequest, first_clip_rows, run_rollouts
from ebt.outputs import write_text
from ebt.plots import pyplot, save_figure
from ebt.training import tracking
from ebt.training.rundir import flatten_config
from ebt.training.tracking import METRICS_FILE

TRAIN_PANELS = (
    ("loss", ("loss", "initial_loss", "final_step_loss")),
    ("energy gap (first - last step)", ("energy_gap",)),
    ("learning rate", ("lr/",)),
    ("step size", ("step_size",)),
)
SAMPLE_PROMPT = "def "


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The readable rows of RUN/metrics.jsonl (unreadable lines skipped with a count on stderr)."""
    if not (run / METRICS_FILE).is_file():
        raise EbtError(f"{run}: no {METRICS_FILE} (not a run directory, or never trained)")
    return tracking.read_metrics(run)


def _series(rows: list[dict[str, Any]], key: str) -> dict[str, tuple[list, list]]:
    """Training-row series matching `key` (a prefix when it ends in '/'): name -> (x, y)."""
    found: dict[str, tuple[list, list]] = {}
    for row in rows:
        if "split" in row or "event" in row:
            continue
        for name, value in row.items():
            match = name.startswith(key) if key.endswith("/") else name == key
            if match and isinstance(value, int | float):
                found.setdefault(name, ([], []))
                found[name][0].append(row["step"])
                found[name][1].append(value)
    return found


def _val_series(rows: list[dict[str, Any]]) -> dict[str, tuple[list, list]]:
    """Validation loss per thinking step: 'val step k' -> (steps, losses)."""
    found: dict[str, tuple[list, list]] = {}
    for row in rows:
        if row.get("split") != "val":
            continue
        for index, value in enumerate(row.get("loss_per_step", [row.get("loss")])):
            found.setdefault(f"val, thinking step {index + 1}", ([], []))
            found[f"val, thinking step {index + 1}"][0].append(row["step"])
            found[f"val, thinking step {index + 1}"][1].append(value)
    return found


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """One panel per quantity; every run's series drawn in it (run name in the label)."""
    plt = pyplot()

    panels = [*TRAIN_PANELS, ("validation loss per thinking step", ())]
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
    for axis, (title, keys) in zip(axes[:, 0], panels, strict=True):
        for name, rows in runs.items():
            series = _val_series(rows) if not keys else {}
            for key in keys:
                series |= _series(rows, key)
            for label, (x, y) in series.items():
                axis.plot(x, y, label=f"{name}: {label}" if len(runs) > 1 else label)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        if axis.lines:
            axis.legend(fontsize=6)
        if title == "loss" and axis.lines:
            axis.set_yscale("log")
    figure.tight_layout()
    return save_figure(figure, path, dpi=110)


def _last_evaluations(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if isinstance(row.get("split"), str):
            last[row["split"]] = row
    return last


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_format(item) for item in value)
    return str(value)


def _evaluation_lines(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| run | split | step | metrics |", "|---|---|---|---|"]
    for name, rows in runs.items():
        for split, row in _last_evaluations(rows).items():
            metrics = "; ".join(
                f"{key} {_format(value)}"
                for key, value in row.items()
                if key not in ("split", "step")
            )
            lines.append(f"| {name} | {split} | {row['step']} | {metrics} |")
    return lines


def _text_sample(run_dir: Path) -> list[str]:
    run = load_run(run_dir)
    pieces = generate(run, SAMPLE_PROMPT, max_new_tokens=120, sampling=Sampling(temperature=0))
    text = SAMPLE_PROMPT + "".join(pieces)
    return ["Greedy sample (prompt `def `, 120 tokens):", "", "```", text, "```"]


def _image_grid(run_dir: Path, path: Path) -> list[str]:
    run = load_run(run_dir, modality="image", verb="the report's denoising grid")
    diffusion = denoise.run_diffusion(run)
    level = run.config.data.noise_level
    options = denoise.DenoiseOptions(denoise.InferenceOptions(), 0.05, None)
    spec = denoise.CurveSpec([level], [1], [1], options, run.config.train.seed, False)
    crops = denoise.eval_crops(run, "val", 1)
    result, galleries = denoise.denoising_curves(run.model, diffusion, crops, spec, None, False)
    denoise.write_grid(galleries, path)
    return [f"Denoising at noise {level} (validation crops):", "", f"![grid]({path.name})"]


def _video_strip(run_dir: Path, config: dict[str, Any], path: Path) -> list[str]:
    """A rollout of 4 validation clips (as `ebt rollout`): the strip of the first, PSNR per
    horizon of all."""
    context = max(1, min(4, config["data"]["frames"] - 1))
    request = RolloutRequest(context=context, frames=8, clips=4)
    runs = {"run": load_run(run_dir, modality="video", verb="the report's rollout strip")}
    outcome = run_rollouts(request, runs)
    write_strip(first_clip_rows(outcome, context), context, path)
    models = dict(sorted(outcome.report["models"].items()))  # by name, as `ebt rollout --json`
    horizons = sorted(next(iter(models.values()))["horizons"])
    command = f"rollout {run_dir} --context {context} --frames 8 --clips 4"
    header = "| model | " + " | ".join(f"PSNR @{h}" for h in horizons)
    lines = [f"Rollout ({context} real frames, then 8 predicted; `{command}`):", ""]
    lines += [header + " |", "|---" * (header.count("|")) + "|"]
    for name, report in models.items():
        cells = " | ".join(f"{report['horizons'][h]['psnr']:.2f}" for h in horizons)
        lines.append(f"| {name} | {cells} |")
    return [*lines, "", f"![strip]({path.name})"]


def _showcase(run_dir: Path, config: dict[str, Any], path: Path) -> list[str]:
    """What the model does, by modality: a text sample, a denoising grid, a rollout strip."""
    modality = config["model"]["modality"]
    if modality == "text":
        return _text_sample(run_dir)
    if modality == "image":
        return _image_grid(run_dir, path)
    return _video_strip(run_dir, config, path)


def _config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise EbtError(f"{run_dir}: no config.json (not a run directory)")
    return json.loads(path.read_text(encoding="utf-8"))


def _config_lines(configs: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    if len(configs) > 1:
        flat = {name: flatten_config(config) for name, config in configs.items()}
        keys = sorted({key for values in flat.values() for key in values})
        differ = [key for key in keys if len({json.dumps(v.get(key)) for v in flat.values()}) > 1]
        lines += ["Keys that differ:", "", "| key | " + " | ".join(configs) + " |"]
        lines.append("|---" * (len(configs) + 1) + "|")
        for key in differ:
            lines.append(f"| {key} | " + " | ".join(_format(flat[n].get(key)) for n in flat) + " |")
        lines.append("")
    for name, config in configs.items():
        lines += [f"`{name}`:", "", "```json", json.dumps(config, indent=2), "```", ""]
    return lines


def write_run_report(runs: list[str], output: str | Path) -> Path:
    """Write the report (and its PNGs beside it); returns its path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    dirs = {Path(run).name or str(run): Path(run) for run in runs}
    metrics = {name: read_metrics(path) for name, path in dirs.items()}
    configs = {name: _config(path) for name, path in dirs.items()}
    curves = plot_curves(metrics, output.with_name(f"{output.stem}-curves.png"))
    lines = [f"# Report: {', '.join(dirs)}", "", "## Training", "", f"![curves]({curves.name})"]
    lines += ["", "## Evaluation (last of each split)", "", *_evaluation_lines(metrics), ""]
    for index, (name, path) in enumerate(dirs.items()):
        picture = output.with_name(f"{output.stem}-{index}.png")
        lines += [f"## {name}: samples", "", *_showcase(path, configs[name], picture), ""]
    lines += ["## Config", "", *_config_lines(configs)]
    write_text(output, "\n".join(lines))  # atomic: never a half-written report
    return output
