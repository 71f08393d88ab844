"""`ebt experiment scaling`: one axis at a time, every point a normal run, rates fitted.

A study is a base config, an axis with its values and the models to compare (the EBT as
configured and its modality's baseline twin, `model.kind` swapped). Each point trains in its
own run directory `OUT/runs/<model>-<axis>-<value>` through `ebt.training.trainer.train`, so it
resumes after an interruption and runs data-parallel under torchrun. Finished points are recorded in
`OUT/results.json` (written atomically after each point, by rank 0); running the same command
again skips them and resumes the unfinished one from its checkpoint. Changing the study (its
config, overrides, axis, models or metric) under the same OUT is refused: a results file never
mixes two studies. Values may change: new ones are trained, finished ones kept, and the fits
and the report cover the values asked for. After the last point the fits, `report.md` and the
plots are written (report.py).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ebt.config import Config, ConfigError, apply_overrides, finalize, load_config
from ebt.experiment.axes import Point, axis_overrides, copy_config, parse_values
from ebt.experiment.flops import parameter_counts, training_flops_per_step
from ebt.experiment.report import write_report
from ebt.modalities import MODALITIES, unit_for
from ebt.models import build_model
from ebt.outputs import write_text
from ebt.training import trainer
from ebt.training.bench import baseline_config, vocabulary_size
from ebt.training.distributed import barrier, is_main_process, setup, teardown

RESULTS_FILE = "results.json"
MODELS = ("ebt", "baseline")
# How a point runs, not what it computes: a study may resume with these changed.
RUNTIME_KEYS = ("num_threads", "progress", "device", "log_every", "tensorboard", "wandb")


@dataclass
class Study:
    """What a scaling study runs: `config` at each of `values` of `axis`, for each model."""

    config: str
    axis: str
    values: list[str]
    models: list[str] = field(default_factory=lambda: list(MODELS))
    overrides: list[str] = field(default_factory=list)
    out_dir: str = "runs/scaling"
    metric: str = ""  # "" = the modality's default (ModalityUnit.default_metric)

    def identity(self, base: Config) -> dict[str, Any]:
        """What must match for a results file to belong to this study: everything but the
        values (points are kept by name, so values may be added or dropped) and RUNTIME_KEYS."""
        config = base.to_dict()
        config["train"] = {k: v for k, v in config["train"].items() if k not in RUNTIME_KEYS}
        return {
            "axis": self.axis,
            "models": self.models,
            "metric": self.metric,
            "base_config": config,
        }


def parse_models(text: str) -> list[str]:
    models = [model.strip() for model in text.split(",") if model.strip()]
    unknown = [model for model in models if model not in MODELS]
    if unknown or not models or len(set(models)) != len(models):
        raise ConfigError(f"--models {text!r}: a comma-separated subset of {', '.join(MODELS)}")
    return models


def base_config(study: Study) -> Config:
    """The study's config with its overrides, checked (before any point trains)."""
    config = load_config(study.config, study.overrides)
    if config.model.kind != "ebt":
        raise ConfigError(f"{study.config}: a scaling study's config is the EBT (model.kind=ebt)")
    unit = unit_for(config)
    if not study.metric:
        study.metric = unit.default_metric
    known = metric_names(unit.name, study.models)
    if study.metric not in known:
        raise ConfigError(
            f"--metric {study.metric!r}: a {unit.name} study's evaluation rows "
            f"have {', '.join(known)}"
        )
    return config


def metric_names(modality: str, models: list[str]) -> tuple[str, ...]:
    """The metrics a study of these models can fit: the scalar keys of a final evaluation row
    (ebt.training.evaluate) that every model of a study has (`ModalityUnit.metrics`; checked on
    real rows by the experiment tests), and for the EBT alone energy_gap."""
    return MODALITIES[modality].metrics + (("energy_gap",) if models == ["ebt"] else ())


def plan(study: Study, base: Config) -> list[Point]:
    """Every point of the study, model by model in increasing order of the axis."""
    values = parse_values(study.axis, ",".join(study.values))
    return [
        Point(study.axis, value, model, tuple(axis_overrides(base, study.axis, value)))
        for model in study.models
        for value in values
    ]


def point_config(study: Study, base: Config, point: Point) -> Config:
    """The config a point trains: the base (or its baseline twin) at the point's value."""
    config = copy_config(base)
    if point.model == "baseline":
        config = baseline_config(config)
    run_dir = Path(study.out_dir) / "runs" / point.name
    apply_overrides(config, [*point.overrides, f"train.out_dir={run_dir}"])
    return finalize(config)


def load_results(study: Study, base: Config) -> dict[str, Any]:
    """The study's results file (empty if new); refuses one written by a different study."""
    path = Path(study.out_dir) / RESULTS_FILE
    identity = json.loads(json.dumps(study.identity(base)))  # as it reads back from disk
    if not path.exists():
        return {"study": identity, "points": {}}
    results = json.loads(path.read_text(encoding="utf-8"))
    if results.get("study") != identity:
        raise ConfigError(
            f"{path} belongs to a different study (config, overrides, axis, values, models or "
            "metric changed): give a new --out, or remove that directory to start over"
        )
    return results


def save_results(study: Study, results: dict[str, Any]) -> Path:
    """Write results.json atomically (a crash leaves the old or the new file, never half)."""
    text = json.dumps(results, indent=2, sort_keys=True) + "\n"
    return write_text(Path(study.out_dir) / RESULTS_FILE, text)


def _x(point: Point, config: Config, counts: dict[str, int]) -> float:
    """Where a point sits on its axis (data: tokens or examples actually trained)."""
    train, units = config.train, unit_for(config).units_per_example(config)
    return {
        "data": train.max_steps * train.batch_size * units,
        "steps": train.max_steps,
        "batch": train.batch_size,
        "depth": config.model.layers,
        "width": config.model.dim,
        "params": counts["non_embedding_parameters"],
    }[point.axis]


def measure_point(study: Study, point: Point, config: Config, final: dict[str, Any]) -> dict:
    """A finished point's row: its axis position, metric, counted FLOPs and parameters."""
    vocab_size = vocabulary_size(config)
    counts = parameter_counts(build_model(config, vocab_size))
    per_step = training_flops_per_step(config, vocab_size)
    if study.metric not in final:
        raise ConfigError(f"--metric {study.metric!r}: the evaluation row has {sorted(final)}")
    return (
        asdict(point)
        | {"name": point.name}
        | counts
        | {
            "x": _x(point, config, counts),
            "metric": float(final[study.metric]),
            "final_eval": final,
            "max_steps": config.train.max_steps,
            "batch_size": config.train.batch_size,
            "flops_per_step": per_step,
            "flops": per_step * config.train.max_steps,
            "run_dir": config.train.out_dir,
        }
    )


def run_study(study: Study, progress: Any = None) -> dict[str, Any]:
    """Train every unfinished point, record each as it finishes, then fit and report. Under
    torchrun the study holds the process group from its first point to its end (each point's
    training runs on every rank; rank 0 alone writes and reports)."""
    base = base_config(study)
    context = setup(base.train.device)
    try:
        results = _run_points(study, base, progress if context.is_main else lambda line: None)
        barrier()  # rank 0 has written the report
        return results
    finally:
        if context.owns_group:
            teardown()


def _run_points(study: Study, base: Config, progress: Any) -> dict[str, Any]:
    points = plan(study, base)
    configs = {point.name: point_config(study, base, point) for point in points}
    results = load_results(study, base)
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    for index, point in enumerate(points, start=1):
        config = configs[point.name]
        label = f"[{index}/{len(points)}] {point.name}"
        if point.name in results["points"]:
            done = results["points"][point.name]["metric"]
            say(f"{label}: done before ({study.metric} {done:.4g})")
            continue
        say(f"{label}: training {config.train.max_steps} steps in {config.train.out_dir}")
        start = time.perf_counter()
        final = trainer.train(config)  # looked up at call time (tests replace it)
        row = measure_point(study, point, config, final) | {"seconds": time.perf_counter() - start}
        results["points"][point.name] = row
        if is_main_process():
            save_results(study, results)
        say(f"{label}: {study.metric} {row['metric']:.4g} in {row['seconds']:.0f} s")
    if is_main_process():  # fitted and reported: this study's values only
        current = results | {"points": {n: results["points"][n] for n in configs}}
        results["report"] = str(write_report(study, current))
        results["fits"] = current["fits"]
        save_results(study, results)
    return results | {"points": {name: results["points"][name] for name in configs}}
