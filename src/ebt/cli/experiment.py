"""`ebt experiment scaling|thinking-shift` and `ebt report`: argument parsing and printing."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ebt.cli.args import COUNT, INT_0, STEPS_LIST
from ebt.outputs import DIRECTORY, MARKDOWN, PNG, Output, check_outputs


def cmd_scaling(args: argparse.Namespace) -> int:
    from ebt.config import ConfigError, load_config
    from ebt.experiment.axes import parse_values
    from ebt.experiment.preset import read_preset
    from ebt.experiment.scaling import Study, parse_models, run_study
    from ebt.training.distributed import is_main_process

    preset = read_preset(args.config)
    if preset is None:  # a plain config: a missing or malformed file is named here, in one line
        load_config(args.config)
        preset = {"config": args.config}
    chosen = {key: getattr(args, key) for key in ("axis", "values", "models", "metric", "out")}
    settings = preset | {key: value for key, value in chosen.items() if value is not None}
    settings.setdefault("models", "ebt,baseline")
    settings.setdefault("out", "runs/scaling")
    for flag in ("axis", "values"):
        if flag not in settings:
            raise ConfigError(f"--{flag} is required (or use a study preset with [study] {flag})")
    check_outputs([Output("--out", settings["out"], DIRECTORY)])  # before any training
    study = Study(
        config=settings["config"],
        axis=settings["axis"],
        values=parse_values(settings["axis"], settings["values"]),
        models=parse_models(settings["models"]),
        overrides=[*preset.get("overrides", []), *args.overrides],
        out_dir=settings["out"],
        metric=settings.get("metric") or "",
    )
    results = run_study(study)
    if is_main_process():
        summary = {"report": results["report"], "fits": results["fits"]}
        print(json.dumps(summary, indent=2) if args.json else f"report: {results['report']}")
    return 0


def cmd_thinking_shift(args: argparse.Namespace) -> int:
    from ebt.experiment.shift import thinking_shift

    check_outputs([Output("--plot", args.plot, PNG)])  # before anything loads
    result = thinking_shift(
        args.run,
        args.data,
        args.steps,
        args.samples,
        args.batches,
        args.baseline,
        args.plot,
        args.from_steps,
        args.overrides,
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ebt.experiment.run_report import write_run_report

    check_outputs([Output("-o", args.output, MARKDOWN)], inputs=args.runs)
    print(write_run_report(args.runs, args.output))
    return 0


def add_experiment_commands(sub: Any) -> None:
    experiment = sub.add_parser("experiment", help="scaling studies and thinking against shift")
    kinds = experiment.add_subparsers(dest="experiment", required=True)
    scaling = kinds.add_parser("scaling", help="train a grid along one axis, fit power laws")
    scaling.add_argument("config", help="a config, or a study preset (configs/experiments/)")
    scaling.add_argument("overrides", nargs="*", help="section.key=value for every point")
    scaling.add_argument("--axis", choices=["data", "batch", "depth", "width", "params", "steps"])
    scaling.add_argument("--values", help="comma-separated, e.g. 1e5 as 100000")
    scaling.add_argument("--models", help="ebt,baseline (default) or one of them")
    scaling.add_argument("--metric", help="default: ppl (text), psnr (images), loss (video)")
    scaling.add_argument("--out", help="study directory (default runs/scaling)")
    scaling.add_argument("--json", action="store_true")
    scaling.set_defaults(handler=cmd_scaling)

    shift = kinds.add_parser("thinking-shift", help="thinking gains against distribution shift")
    shift.add_argument("run")
    shift.add_argument("overrides", nargs="*", help="section.key=value, e.g. think.selection=...")
    shift.add_argument("--data", nargs="*", default=[], help="sets: val, pydoc, files/globs")
    shift.add_argument("--baseline", default="", help="a Transformer++ run: its flat line")
    shift.add_argument("--steps", type=STEPS_LIST, default=[1, 2, 4, 8])
    shift.add_argument("--samples", type=STEPS_LIST, default=[1, 4])
    shift.add_argument("--batches", type=COUNT, default=8)
    shift.add_argument("--plot", default="", help="write the plot to this PNG")
    shift.add_argument(
        "--from-steps", type=INT_0, default=0, help="gains from this many steps (0: the trained)"
    )
    shift.set_defaults(handler=cmd_thinking_shift)

    report = sub.add_parser("report", help="a markdown report of one run or a comparison")
    report.add_argument("runs", nargs="+")
    report.add_argument("-o", "--output", default="report.md")
    report.set_defaults(handler=cmd_report)
