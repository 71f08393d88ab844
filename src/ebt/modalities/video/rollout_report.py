"""The rollout report of video runs (what `ebt rollout` prints and `ebt report` shows): each
run's rollout of the same clips beside the copy-the-last-frame anchor, scored per horizon, with
the thinking used and (optionally) cached-versus-recompute timing. Typed requests only: the
command line builds a `RolloutRequest` from its flags."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ebt.modalities.video import rollout as ro
from ebt.modalities.video.thinking import FrameThinking, start_kind
from ebt.modalities.video.verification import heat_row
from ebt.models import EnergyTransformer
from ebt.thinking.loop import InferenceOptions

if TYPE_CHECKING:
    from ebt.api import LoadedRun
    from ebt.config import Config

ANCHOR = "copy_last"


@dataclass(frozen=True)
class RolloutRequest:
    """What to roll out and how: the clips (`video`: a file, else the run's `split`), the frames
    given and predicted, the EBT's thinking, and the optional benchmark."""

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
    starts: str = "auto"
    bench: bool = False
    repeats: int = 3


@dataclass
class RolloutOutcome:
    """The JSON report, the rollouts by model, the clips (B, L, 3, S, S) and the FrameCodec."""

    report: dict[str, Any]
    rollouts: dict[str, ro.Rollout]
    clips: torch.Tensor
    codec: ro.FrameCodec


def frame_thinking(request: RolloutRequest, config: Config) -> FrameThinking:
    """The FrameThinking of the request (the run's think.init and init_scale)."""
    think = config.think
    return FrameThinking(
        request.steps,
        request.samples,
        request.perturbation,
        request.halt_tolerance,
        think.init,
        think.init_scale,
        request.options,
        request.starts,
    )


def _clips(request: RolloutRequest, config: Config) -> tuple[torch.Tensor, str, str]:
    """(clips (B, L, 3, S, S), source, split) from the request's video or the run's data."""
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


def _predictor(request: RolloutRequest, run: LoadedRun, cached: bool = True) -> ro.FramePredictor:
    """A run's rollout predictor; an EBT thinks per the request from its own think.init."""
    return ro.predictor_for(run.model, frame_thinking(request, run.config), cached=cached)


def _thinking_summary(thinking: FrameThinking, model: torch.nn.Module) -> dict[str, Any]:
    summary = {key: value for key, value in vars(thinking).items() if key != "options"}
    if isinstance(model, EnergyTransformer) and thinking.samples > 1:
        summary["starts"] = start_kind(model, thinking)  # what "auto" resolved to
    return summary | vars(thinking.options)


def rollout_report(request: RolloutRequest, runs: dict[str, LoadedRun]) -> RolloutOutcome:
    """Roll out `runs` ("run", optionally "compare") and the anchor on the same clips, each from
    the same seed (default the run's train.seed)."""
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
        "thinking": _thinking_summary(frame_thinking(request, thinker.config), thinker.model),
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
    return RolloutOutcome(report, rollouts, clips, codec)


def run_rollouts(request: RolloutRequest, runs: dict[str, LoadedRun]) -> RolloutOutcome:
    """`rollout_report` on the run's train.num_threads (as ebt bench: tiny models are fastest
    on 1), the process's thread count restored after; the report names the threads used."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(runs["run"].config.train.num_threads or threads)
        outcome = rollout_report(request, runs)
        outcome.report["threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    return outcome


def first_clip_rows(outcome: RolloutOutcome, context: int) -> dict[str, torch.Tensor]:
    """The first clip as pictures show it: the truth, then each model's rollout after the
    `context` real frames, all (L, 3, S, S) in [-1, 1]; under a patch-token EBT's row, its final
    energy per patch as a heat map (blank context columns)."""
    clips = outcome.clips
    rows = {"truth": clips[0]}  # (L, 3, S, S)
    for name, result in outcome.rollouts.items():
        predicted = outcome.codec.decode(result.frames[:1])[0]  # (H, 3, S, S)
        rows[name] = torch.cat((clips[0, :context], predicted))  # (L, 3, S, S)
        if result.patch_energies is not None:  # patch tokens: where the EBT is unsure
            side = clips.shape[-1]
            rows[f"{name} energy"] = heat_row(result.patch_energies[0], context, side)
    return rows
