"""`ebt probe dyck|arithmetic RUN`: answer perplexity and exact match per thinking steps x
best-of-N, in and out of distribution, with the compute each point cost
(see ebt.modalities.text.probe)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ebt.cli.args import (
    COUNT,
    SEED,
    STEPS_LIST,
    add_selection_options,
    add_thinking_options,
    print_json,
    selection_options,
)
from ebt.config import ConfigError
from ebt.data import probes as probe_data
from ebt.outputs import PNG, Output, atomic_path, check_outputs
from ebt.plots import pyplot, save_figure

if TYPE_CHECKING:
    from ebt.modalities.text.probe import ProbeRequest

DEFAULT_PROBLEMS, DEFAULT_BATCH = 256, 64


def resolve_spec(probe: str, source: str, run_source: str) -> probe_data.Spec:
    """The problems' spec: --source if given, else the run's data.source when it is this
    probe, else the probe's defaults. A --source of another probe fails in one line."""
    if source:
        try:
            spec = probe_data.parse_source(source)
        except probe_data.DataError as error:
            raise ConfigError(f"--source: {error}") from None
        if spec.name != probe:
            raise ConfigError(f"--source={source!r}: not a {probe} source (use {probe}[:k=v,...])")
        return probe_data.replace(spec, ood=False)
    if probe_data.is_probe_source(run_source) and run_source.split(":")[0].strip() == probe:
        return probe_data.replace(probe_data.parse_source(run_source), ood=False)
    return probe_data.parse_source(probe)


@dataclass(frozen=True)
class ProbeCommand:
    """What `ebt probe` measures on a run: the probe, its problems' source ("" = the run's or
    the probe's defaults), the points (steps x best-of-N, problems, batch, seed, thinking
    options) and the best-of-N selection flags (None: the run's think.selection*)."""

    probe: str
    source: str
    measure: ProbeRequest
    selection: str | None = None
    selection_temperature: float | None = None


def probe_command(args: argparse.Namespace) -> ProbeCommand:
    """The typed request of the parsed flags (probes think without halting)."""
    from ebt.cli.args import thinking_options
    from ebt.modalities.text.probe import ProbeRequest

    measure = ProbeRequest(
        args.steps, args.samples, args.problems, args.batch_size, args.seed, thinking_options(args)
    )
    return ProbeCommand(
        args.probe, args.source, measure, args.selection, args.selection_temperature
    )


def probe_run(path: str, overrides: list[str], command: ProbeCommand) -> dict[str, Any]:
    """Load a run, build its probe sets and measure every point."""
    from ebt.api import load_run
    from ebt.modalities.text.probe import probe_sets, run_probe

    run = load_run(path, overrides, modality="text", verb="ebt probe")
    data = run.config.data
    spec = resolve_spec(command.probe, command.source, data.source)
    problems = command.measure.problems
    sets = probe_sets(spec, run.tokenizer, data.seq_len, problems, data.val_fraction)
    request = replace(command.measure, selection=selection_options(command, run.config.think))
    result = run_probe(run.model, sets, request) | {"checkpoint": str(run.checkpoint)}
    return result | {"selection": vars(request.selection)}


def plot_probe(result: dict[str, Any], path: str | Path) -> Path:
    """Answer perplexity (top) and exact match (bottom) against energy evaluations per token,
    in distribution (left) and out (right); one line per best-of-N, the baseline flat."""
    plt = pyplot()

    splits = list(result["problems"])
    figure, axes = plt.subplots(2, len(splits), figsize=(5.5 * len(splits), 7), squeeze=False)
    for column, split in enumerate(splits):
        for row, key in enumerate(("answer_ppl", "exact_match")):
            _plot_panel(axes[row][column], result, split, key)
    figure.suptitle(f"ebt probe {result['probe']}: {result['checkpoint']}", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def _plot_panel(axis: Any, result: dict[str, Any], split: str, key: str) -> None:
    points = [p for p in result["curves"] if p["split"] == split]
    for samples in sorted({p["samples"] for p in points}):
        line = sorted((p for p in points if p["samples"] == samples), key=lambda p: p["steps"])
        x = [p["forward_passes_per_token"] for p in line]
        y = [p[key] for p in line]
        axis.plot(x, y, marker="o", label=f"EBT best of {samples}")
        for point, at_x, at_y in zip(line, x, y, strict=True):  # label: steps
            axis.annotate(
                f"{point['steps']}",
                (at_x, at_y),
                xytext=(0, 5),
                fontsize=7,
                textcoords="offset points",
                ha="center",
            )
    if "baseline" in result:
        value = next(p[key] for p in result["baseline"]["curves"] if p["split"] == split)
        axis.axhline(value, color="black", linestyle="--", label="Transformer++ (1 pass)")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("energy evaluations per token (labels: thinking steps)")
    axis.set_ylabel(key.replace("_", " "))
    axis.set_title(f"{split} ({result['sources'][split]})", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def cmd_probe(args: argparse.Namespace) -> int:
    command = probe_command(args)
    check_outputs([Output("--plot", args.plot, PNG)])  # before anything loads
    result = {"probe": args.probe} | probe_run(args.run, args.overrides, command)
    result["options"] = vars(command.measure.options)
    if args.baseline:  # the same problems
        same = replace(command, source=result["sources"]["in"])
        result["baseline"] = probe_run(args.baseline, [], same)
    if args.plot:
        with atomic_path(args.plot) as temporary:
            plot_probe(result, temporary)
        result["plot"] = args.plot
    print_json(result) if args.json else print(json.dumps(result, indent=2))
    return 0


def add_probe_command(sub: Any) -> None:
    """Register `ebt probe`."""
    probe = sub.add_parser("probe", help="reasoning probes: Dyck / arithmetic answers vs thinking")
    probe.add_argument("probe", choices=list(probe_data.SPECS))
    probe.add_argument("run", help="run directory (or one of its step_* checkpoints)")
    probe.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    probe.add_argument("--steps", type=STEPS_LIST, default=[1, 2, 4], help="e.g. 1,2,4")
    probe.add_argument("--samples", type=STEPS_LIST, default=[1, 4], help="best-of-N, e.g. 1,4")
    probe.add_argument("--problems", type=COUNT, default=DEFAULT_PROBLEMS, help="per split")
    probe.add_argument("--batch-size", type=COUNT, default=DEFAULT_BATCH)
    probe.add_argument(
        "--source", default="", help="the problems, e.g. dyck:max_depth=4 (default: the run's)"
    )
    probe.add_argument("--baseline", default="", help="also probe this run (a Transformer++)")
    probe.add_argument("--seed", type=SEED, default=0)
    probe.add_argument("--plot", default="", help="write the curves to this PNG")
    add_thinking_options(probe)
    add_selection_options(probe)
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(handler=cmd_probe)
