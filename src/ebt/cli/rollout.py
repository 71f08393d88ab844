"""`ebt rollout`: autoregressive next-frame rollout of a video run on its KV cache (each frame
predicted from the predictions before it), scored by PSNR and SSIM per horizon against the
true frames, beside a baseline run (--compare) and the copy-the-last-frame anchor; the EBT's
final energy of every predicted frame; a strip image, a GIF, an energy-over-time plot; and
(--bench) milliseconds per frame with the KV cache against recomputing every frame."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

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
from ebt.outputs import GIF, PNG, Output, atomic_path, check_outputs, written_lines
from ebt.thinking.loop import InferenceOptions

if TYPE_CHECKING:
    from ebt.api import LoadedRun
    from ebt.config import Config
    from ebt.modalities.video.rollout import FramePredictor
    from ebt.modalities.video.thinking import FrameThinking

ANCHOR = "copy_last"


@dataclass(frozen=True)
class RolloutRequest:
    """What `ebt rollout` rolls out and how: the clips (`video`: a file, else the run's `split`),
    the frames given and predicted, the EBT's thinking, and the optional benchmark."""

    context: int = 4
    frames: int = 12
    clips: int = 8
    video: str = ""
    stride: int | None = None
    split: str = "val"
    seed: int | None = None
    steps: int | None = None
    samples: int = 1
    perturbation: float = 0.1
    halt_tolerance: float | None = None
    options: InferenceOptions = field(default_factory=InferenceOptions)
    bench: bool = False
    repeats: int = 3


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
        options=thinking_options(args),  # refuses --halt-tolerance with --accept-lower-energies
        bench=args.bench,
        repeats=args.repeats,
    )


def frame_thinking(request: RolloutRequest, config: Config) -> FrameThinking:
    """The FrameThinking of the request (the run's think.init and init_scale)."""
    from ebt.modalities.video.thinking import FrameThinking

    think = config.think
    return FrameThinking(
        request.steps,
        request.samples,
        request.perturbation,
        request.halt_tolerance,
        think.init,
        think.init_scale,
        request.options,
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


def _clips(request: RolloutRequest, config: Config) -> tuple[torch.Tensor, str, str]:
    """(clips (B, L, 3, S, S), source, split) from the request's video or the run's data."""
    from ebt.modalities.video import rollout as ro

    length = request.context + request.frames
    if request.video:
        stride = request.stride or config.data.frame_stride
        size = config.data.frame_size
        clips = ro.video_file_clips(
            request.video, request.context, length, request.clips, size, stride
        )
        if clips.shape[1] < length:
            print(
                f"ebt: warning: '{request.video}' has {clips.shape[1]} frames: rolling out "
                f"{clips.shape[1] - request.context} instead of {request.frames}",
                file=sys.stderr,
            )
        return clips, request.video, "file"
    clips = ro.run_clips(config, request.split, length, request.clips)
    return clips, config.data.source, request.split


def _named(runs: dict[str, LoadedRun]) -> dict[str, LoadedRun]:
    """The runs by their name in the report: their kind (ebt / transformer_pp); a second run of
    the same kind is `compare`."""
    named: dict[str, LoadedRun] = {}
    for role, run in runs.items():
        kind = run.config.model.kind
        named["compare" if role == "compare" and kind in named else kind] = run
    return named


def _predictor(request: RolloutRequest, run: LoadedRun, cached: bool = True) -> FramePredictor:
    """A run's rollout predictor; an EBT thinks per the request from its own think.init."""
    from ebt.modalities.video import rollout as ro

    return ro.predictor_for(run.model, frame_thinking(request, run.config), cached=cached)


def rollout_report(request: RolloutRequest, runs: dict[str, LoadedRun]) -> tuple:
    """(the JSON report, the rollouts by model, the clips (B, L, 3, S, S), the FrameCodec)."""
    from ebt.modalities.video import rollout as ro

    config = runs["run"].config
    clips, source, split = _clips(request, config)
    codec = ro.FrameCodec(config)
    vectors = codec.encode(clips)  # (B, L, F)
    context, truth = vectors[:, : request.context], vectors[:, request.context :]
    seed = config.train.seed if request.seed is None else request.seed
    reports, rollouts = {}, {}
    predictors = {name: _predictor(request, run) for name, run in _named(runs).items()}
    for name, predictor in (predictors | {ANCHOR: ro.CopyLast()}).items():
        torch.manual_seed(seed)
        reports[name], rollouts[name] = ro.model_report(predictor, context, truth, clips, codec)
    thinker = next((r for r in runs.values() if r.config.model.kind == "ebt"), runs["run"])
    report: dict[str, Any] = {
        "checkpoint": str(runs["run"].checkpoint),
        "source": source,
        "split": split,
        "context": request.context,
        "frames": truth.shape[1],
        "clips": clips.shape[0],
        "seed": seed,
        "thinking": _thinking_summary(frame_thinking(request, thinker.config)),
        "models": reports,
    }
    if "compare" in runs:
        report["compare"] = str(runs["compare"].checkpoint)
    if request.bench:
        report["bench"] = {
            name: ro.benchmark(
                lambda cached, run=run: _predictor(request, run, cached),
                context,
                truth.shape[1],
                request.repeats,
                seed,
            )
            for name, run in _named(runs).items()
        }
    return report, rollouts, clips, codec


def _thinking_summary(thinking: FrameThinking) -> dict[str, Any]:
    summary = {key: value for key, value in vars(thinking).items() if key != "options"}
    return summary | vars(thinking.options)


def picture_outputs(args: argparse.Namespace) -> list[Output]:
    """The strip, GIF and plot the flags ask for, checked before anything loads."""
    outputs = [Output("--strip", args.strip, PNG), Output("--gif", args.gif, GIF)]
    outputs.append(Output("--plot", args.plot, PNG))
    return check_outputs(outputs, inputs=[args.video])


def _pictures(outputs: list[Output], context: int, report: dict, outcome: tuple) -> None:
    """The strip / GIF of the first clip and the energy plot asked for: each drawn into a
    temporary file, and all renamed into place only when every one was drawn."""
    from ebt.modalities.video import figures as figures

    _, rollouts, clips, codec = outcome
    rows = {"truth": clips[0]}  # (L, 3, S, S)
    for name, result in rollouts.items():
        predicted = codec.decode(result.frames[:1])[0]  # (H, 3, S, S)
        rows[name] = torch.cat((clips[0, :context], predicted))  # (L, 3, S, S)
    energies = next((r.energies for r in rollouts.values() if r.energies is not None), None)
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
    threads = torch.get_num_threads()
    try:  # the run's train.num_threads, as ebt bench (tiny models: 1 is fastest)
        torch.set_num_threads(run.config.train.num_threads or threads)
        outcome = rollout_report(request, runs)
        outcome[0]["threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    report = outcome[0]
    _pictures(outputs, args.context, report, outcome)
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
        help="best-of-N: per-pixel RMS of the extra starts' offsets (0.1)",
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
