"""`ebt rollout`: autoregressive next-frame rollout of a video run on its KV cache (each frame
predicted from the predictions before it), scored by PSNR and SSIM per horizon against the
true frames, beside a baseline run (--compare) and the copy-the-last-frame anchor; the EBT's
final energy of every predicted frame; a strip image, a GIF, an energy-over-time plot; and
(--bench) milliseconds per frame with the KV cache against recomputing every frame."""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from ebt.cli.args import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    add_run_parser,
    add_thinking_options,
    print_json,
    thinking_options,
)
from ebt.config import ConfigError
from ebt.modalities.video.rollout_report import (
    RolloutOutcome,
    RolloutRequest,
    first_clip_rows,
    run_rollouts,
)
from ebt.modalities.video.thinking import START_KINDS
from ebt.outputs import GIF, PNG, Output, atomic_path, check_outputs, written_lines

if TYPE_CHECKING:
    from ebt.api import LoadedRun
    from ebt.config import Config


def rollout_request(args: argparse.Namespace) -> RolloutRequest:
    """The typed request of the parsed flags (bad thinking-flag combinations fail here)."""
    return RolloutRequest(
        context=args.context,
        frames=args.frames,
        clips=args.clips,
        video=args.video,
        stride=args.stride,
        split="ood" if args.ood else args.split,
        seed=args.seed,
        steps=args.steps,
        samples=args.samples,
        perturbation=args.perturbation,
        halt_tolerance=args.halt_tolerance,
        starts=args.starts,
        options=thinking_options(args),  # refuses --halt-tolerance with --accept-lower-energies
        bench=args.bench,
        repeats=args.repeats,
    )


def _check_frames_match(compare: LoadedRun, run: LoadedRun, path: str) -> None:
    """`--compare path` must have `run`'s frames (size and encoder; ConfigError otherwise)."""
    if _frames_of(compare.config) != _frames_of(run.config):
        raise ConfigError(
            f"--compare {path}: its frames ({_frames_of(compare.config)}) must match the run's "
            f"({_frames_of(run.config)})"
        )


def _frames_of(config: Config) -> str:
    """What a run's frames are: side, encoder, numbers per frame vector."""
    from ebt.models import frame_dim

    data = config.data
    encoder = data.frame_encoder + (
        f" {data.vae} x {data.vae_scaling:g}" if data.frame_encoder == "vae" else ""
    )
    return f"{data.frame_size} px, {encoder}, {frame_dim(config)} numbers"


def _check_context(runs: dict[str, LoadedRun], paths: dict[str, str], context: int) -> None:
    """ConfigError (one line) if a run reads fewer context frames than --context."""
    for role, run in runs.items():
        window = run.config.data.frames - 1
        if context > window:
            raise ConfigError(
                f"--context {context}: {paths[role]} reads at most {window} context frames "
                "(data.frames - 1 of its training)"
            )


def picture_outputs(args: argparse.Namespace) -> list[Output]:
    """The strip, GIF and plot the flags ask for, checked before anything loads."""
    outputs = [Output("--strip", args.strip, PNG), Output("--gif", args.gif, GIF)]
    outputs.append(Output("--plot", args.plot, PNG))
    return check_outputs(outputs, inputs=[args.video])


def _pictures(outputs: list[Output], context: int, outcome: RolloutOutcome) -> None:
    """The strip / GIF of the first clip and the energy plot asked for: each drawn into a
    temporary file, and all renamed into place only when every one was drawn."""
    from ebt.modalities.video import figures as figures

    rows, report = first_clip_rows(outcome, context), outcome.report
    rollouts = outcome.rollouts.values()
    energies = next((r.energies for r in rollouts if r.energies is not None), None)
    draw = {
        "--strip": lambda path: figures.write_strip(rows, context, path),
        "--gif": lambda path: figures.write_gif(rows, path),
        "--plot": lambda path: figures.plot_energy(report, path, energies),
    }
    with ExitStack() as stack:
        for output in outputs:
            draw[output.flag](stack.enter_context(atomic_path(output.path)))
    for output in outputs:
        report[output.flag.removeprefix("--")] = output.path


def _rho(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def _verification_lines(report: dict) -> list[str]:
    """The rank correlation of the EBT's final energies with the errors, per frame and patch."""
    lines = []
    for name, result in report["models"].items():
        if "energy_error_spearman" in result:
            patch = result.get("patch_energy_error_spearman", None)
            per_patch = "" if patch is None else f", per patch {_rho(patch)}"
            frame = _rho(result["energy_error_spearman"])
            within = _rho(result.get("energy_error_spearman_within_horizon"))
            lines.append(
                f"{name} energy vs error (Spearman): per frame {frame}"
                f" (within a horizon {within}){per_patch}"
            )
    return lines


def summary_lines(report: dict) -> str:
    """A human-readable table: PSNR / SSIM at the reported horizons, ms per frame."""
    horizons = list(next(iter(report["models"].values()))["horizons"])
    head = "  ".join(f"PSNR@{h:<3} SSIM@{h:<3}" for h in horizons)
    lines = [
        f"{report['source']} ({report['split']}): {report['clips']} clips, "
        f"{report['context']} context frames, {report['frames']} predicted",
        f"{'model':<15} {head}  ms/frame  energy evals/frame",
    ]
    for name, result in report["models"].items():
        cells = "  ".join(
            f"{result['horizons'][h]['psnr']:8.2f} {result['horizons'][h]['ssim']:8.3f}"
            for h in horizons
        )
        passes = result["forward_passes_per_frame"]
        lines.append(f"{name:<15} {cells}  {result['ms_per_frame']:8.2f}  {passes:g}")
    lines += _verification_lines(report)
    for name, bench in report.get("bench", {}).items():
        lines.append(
            f"bench {name}: {bench['cached_ms_per_frame']:.2f} ms/frame cached, "
            f"{bench['recompute_ms_per_frame']:.2f} recompute "
            f"(paired ratio {bench['speedup']:.2f}x)"
        )
    return "\n".join(lines)


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.ood and args.video:
        raise ConfigError("--ood picks the run's held-out data; it does not combine with --video")
    request = rollout_request(args)  # bad flag combinations fail before anything loads
    outputs = picture_outputs(args)  # and so do output paths
    from ebt.api import load_run

    run = load_run(args.run, args.overrides, modality="video", verb="ebt rollout")
    runs = {"run": run}
    if args.compare:
        runs["compare"] = load_run(args.compare, modality="video", verb="ebt rollout --compare")
        _check_frames_match(runs["compare"], run, args.compare)
    _check_context(runs, {"run": args.run, "compare": args.compare}, args.context)
    outcome = run_rollouts(request, runs)
    report = outcome.report
    _pictures(outputs, args.context, outcome)
    if args.json:
        print_json(report)
        return 0
    print(summary_lines(report))
    written = written_lines({name: report.get(name, "") for name in ("strip", "gif", "plot")})
    if written:
        print(written)
    return 0


def add_rollout_command(sub: Any) -> None:
    help_text = "video runs: autoregressive rollout, PSNR / SSIM per horizon, energy over time"
    parser = add_run_parser(sub, "rollout", cmd_rollout, help_text)
    parser.add_argument("--context", type=COUNT, default=4, help="real frames given (4)")
    parser.add_argument("--frames", type=COUNT, default=12, help="frames to predict (12)")
    parser.add_argument("--video", default="", help="a GIF / MP4 / folder of frames to roll out")
    parser.add_argument("--split", default="val", choices=["val", "test", "ood"])
    parser.add_argument("--ood", action="store_true", help="--split ood: held-out, 2x speed")
    parser.add_argument("--clips", type=COUNT, default=8, help="clips to roll out (8)")
    parser.add_argument("--stride", type=COUNT, default=None, help="--video: data.frame_stride")
    parser.add_argument("--compare", default="", help="a baseline run (Transformer++)")
    parser.add_argument("--steps", type=COUNT, default=None, help="EBT steps per landscape")
    parser.add_argument("--samples", type=COUNT, default=1, help="best-of-N starts per frame")
    parser.add_argument(
        "--perturbation",
        type=NON_NEGATIVE,
        default=0.1,
        help="best-of-N, --starts noise: per-pixel RMS of the extra starts' offsets (0.1)",
    )
    parser.add_argument(
        "--starts",
        choices=START_KINDS,
        default="auto",
        help="best-of-N extra starts: motion (the last frame moved by k/N of the last change), "
        "noise, or auto (motion for patch tokens started from the last frame)",
    )
    parser.add_argument(
        "--halt-tolerance",
        type=POSITIVE,
        default=None,
        help="adaptive halting: a start stops when its energy moves less than this",
    )
    add_thinking_options(parser)
    parser.add_argument("--seed", type=SEED, default=None, help="default: the run's train.seed")
    parser.add_argument("--strip", default="", help="write a PNG strip of the first clip")
    parser.add_argument("--gif", default="", help="write an animated GIF of the first clip")
    parser.add_argument("--plot", default="", help="write a PNG of the energy over time")
    parser.add_argument("--bench", action="store_true", help="ms per frame: cached vs recompute")
    parser.add_argument("--repeats", type=COUNT, default=3, help="--bench: timed rollouts (3)")
    parser.add_argument("--json", action="store_true")
