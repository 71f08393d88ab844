"""Thinking about the next frame at inference (video): steps, step-size and Langevin-noise
overrides, best-of-N from perturbed starts, adaptive halting per frame, and the final energy of
every predicted frame (the model's uncertainty, frame by frame): the one halting loop
(ebt.thinking.halting) and best-of-N (ebt.thinking.selection.self_verify) of every modality.

The N starts of a frame share one context cache: the newest context row is repeated N times
(`rows`), and since a candidate reads only the context and itself, the N copies never see each
other (as text's best-of-N, `ebt.thinking.selection`). The start with the lowest final energy wins,
independently per clip.

Extra starts (`FrameThinking.starts`):

- "motion" (the default for patch-token EBTs started from the last frame): motion hypotheses.
  Start k of N is the last frame moved k / N of the way along the last change,
  x_T + (k / N) (x_T - x_{T-1}): still (k = 0) to nearly the full last change, so the energy
  chooses, per clip, how much of the recent motion carries on.
- "noise": Gaussian offsets of RMS `perturbation`. With one token per frame they lie in the row
  space of the frame embedding W (D x frame_dim): the energy reads a frame x only through W x,
  and the candidate gradient W^T dE/dz lies in that space, so an offset outside it would be
  invisible to verification and never removed by thinking. With patch tokens
  (model.frame_tokens = "patches", 3 p^2 <= D) every pixel is seen: plain per-pixel noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ebt.config_checks import THINK_INITS as INITS
from ebt.models import ContextCache, EnergyTransformer
from ebt.thinking.halting import halt, owned_context
from ebt.thinking.loop import InferenceOptions, cache_of, step_options, step_schedule
from ebt.thinking.selection import Thought, self_verify

START_KINDS = ("auto", "motion", "noise")


@dataclass
class FrameThinking:
    """How the video EBT thinks about each next frame.

    steps: per landscape (None: the trained recipe's). samples: best-of-N starts. perturbation:
    per-pixel RMS of the extra starts' offsets (frame values in [-1, 1]). halt_tolerance: a
    start stops when its energy moves less than this (adaptive halting; steps is the budget).
    init: the first start, "zeros", "random_noise" (times init_scale) or "last_frame".
    starts: the extra starts of best-of-N, "motion" (the last frame moved by fractions of the
    last change), "noise" (offsets of RMS perturbation) or "auto" (motion for patch-token models
    started from the last frame, else noise); see the module docstring.
    """

    steps: int | None = None
    samples: int = 1
    perturbation: float = 0.1
    halt_tolerance: float | None = None
    init: str = "zeros"
    init_scale: float = 1.0
    options: InferenceOptions = field(default_factory=InferenceOptions)
    starts: str = "auto"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"unknown init '{self.init}': use one of {', '.join(INITS)}")
        if self.starts not in START_KINDS:
            kinds = ", ".join(START_KINDS)
            raise ValueError(f"unknown starts '{self.starts}': use one of {kinds}")
        if self.samples < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError(f"need samples >= 1 and steps >= 1, got {self.samples}, {self.steps}")
        if self.perturbation < 0 or (self.halt_tolerance is not None and self.halt_tolerance <= 0):
            raise ValueError("need perturbation >= 0 and a halt_tolerance > 0")
        self.options.check_halting(self.halt_tolerance)


@dataclass
class FrameVerdict:
    """The chosen next frames (B, F), their final energies (B,), the thinking steps the chosen
    starts took (B,), and the energy evaluations spent per frame (forward passes: 1 and no
    energies or steps for a model that does not think); patch-token EBTs: the final energy of
    every patch of the chosen frames (B, P), which sum to `energies`."""

    frames: torch.Tensor
    energies: torch.Tensor | None = None
    steps: torch.Tensor | None = None
    passes: float = 1.0
    patch_energies: torch.Tensor | None = None  # (B, P): patch tokens' final energies


def landscapes_of(model: EnergyTransformer) -> list[int]:
    """The landscapes whose context caches thinking reads (one for a landscape-free context)."""
    return list(range(model.args.landscapes)) if model.context_depends_on_landscape else [0]


def row_space_noise(weight: torch.Tensor, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Gaussian offsets (*shape, F) in the row space of `weight` (D, F) with per-number RMS
    `std` (in expectation)."""
    basis, _ = torch.linalg.qr(weight.detach().t())  # (F, k), k = min(D, F), orthonormal
    rank = basis.shape[1]
    draws = torch.randn(*shape, rank, dtype=weight.dtype, device=weight.device)  # (..., k)
    return draws @ basis.t() * (std * math.sqrt(weight.shape[1] / rank))  # (..., F)


def start_kind(model: EnergyTransformer, thinking: FrameThinking) -> str:
    """The extra starts thinking.starts resolves to for `model`: "motion" or "noise"."""
    if thinking.starts != "auto":
        return thinking.starts
    patches = bool(model.args.patch_size)
    return "motion" if patches and thinking.init == "last_frame" else "noise"


def _noise_offsets(model, last_frame: torch.Tensor, thinking: FrameThinking) -> torch.Tensor:
    """Offsets (B, N - 1, F) of RMS thinking.perturbation, seen by the energy (module doc)."""
    batch, size = last_frame.shape
    if model.args.patch_size:  # patch tokens: every pixel is seen, so every pixel moves
        shape = (batch, thinking.samples - 1, size)
        offsets = torch.randn(shape, dtype=last_frame.dtype, device=last_frame.device)
        return offsets * thinking.perturbation  # (B, N - 1, F)
    weight = model.frame_embedding.weight.to(last_frame.dtype)  # (D, F)
    return row_space_noise(weight, (batch, thinking.samples - 1), thinking.perturbation)


def motion_offsets(change: torch.Tensor, samples: int) -> torch.Tensor:
    """Offsets (B, N - 1, F): k / N of the last change (B, F) for k = 1 .. N - 1."""
    fractions = torch.arange(1, samples, dtype=change.dtype, device=change.device) / samples
    return fractions[None, :, None] * change[:, None, :]  # (B, N - 1, F)


def initial_frames(
    model: EnergyTransformer,
    last_frame: torch.Tensor,
    thinking: FrameThinking,
    previous_frame: torch.Tensor | None = None,
) -> torch.Tensor:
    """Starts (B, N, F) for the frame after `last_frame` (B, F): the first per thinking.init,
    the others offset from it by motion hypotheses (which need `previous_frame` (B, F), the
    frame before the last; without it, noise) or by noise, as start_kind says."""
    if thinking.init == "last_frame":
        base = last_frame.clone()  # (B, F)
    elif thinking.init == "zeros":
        base = torch.zeros_like(last_frame)  # (B, F)
    else:
        base = torch.randn_like(last_frame) * thinking.init_scale  # (B, F)
    starts = base.unsqueeze(1).repeat(1, thinking.samples, 1)  # (B, N, F)
    if thinking.samples == 1:
        return starts
    if start_kind(model, thinking) == "motion" and previous_frame is not None:
        starts[:, 1:] += motion_offsets(last_frame - previous_frame, thinking.samples)
    elif thinking.perturbation > 0:
        starts[:, 1:] += _noise_offsets(model, last_frame, thinking)  # (B, N - 1, F)
    return starts


def _fixed_steps(model, caches, starts, rows, thinking) -> Thought:
    """Every start thinks the same number of steps: final states (B, N, F), energy evaluations
    per start, steps (B, N)."""
    arguments = thinking.options.think_arguments()
    trajectory = model.think(
        None, starts, steps=thinking.steps, rows=rows, caches=caches, **arguments
    )
    taken = len(trajectory.states)
    steps = torch.full(starts.shape[:2], taken, device=starts.device)  # (B, N)
    evaluations = float(taken * thinking.options.evaluations_per_step)
    return Thought(trajectory.states[-1].detach(), evaluations, steps)


def _halting(model, caches, starts, rows, thinking) -> Thought:
    """Every start of every clip stops on its own within the budget (thinking.steps per
    landscape), by ebt.thinking.halting: final states (B, N, F), mean energy evaluations per
    start, steps (B, N). The active starts of all clips think as one batch, each against its
    clip's rows of the context caches, so a step is one pass however many clips."""
    batch, samples, size = starts.shape
    budget = thinking.steps or model.args.inference_steps
    options = step_options(model, thinking.options.step_size, thinking.options.langevin_noise)
    owner = torch.arange(batch, device=starts.device).repeat_interleave(samples)  # (B N,)
    state = starts.reshape(batch * samples, 1, size).clone()  # (B N, 1, F)
    context = owned_context(model, caches, owner, rows[:1])
    schedule = step_schedule(model.args.landscapes, budget)
    halted = halt(model, state, schedule, options, context, thinking.halt_tolerance, dim=0)
    evaluations = float(halted.evaluations.sum()) / (batch * samples)
    steps = halted.steps.view(batch, samples)  # (B, N)
    return Thought(halted.state.view(batch, samples, size), evaluations, steps)


def think_next_frame(
    model: EnergyTransformer,
    caches: dict[int, ContextCache],
    starts: torch.Tensor,
    row: int,
    thinking: FrameThinking,
) -> FrameVerdict:
    """Think from starts (B, N, F) about the frame after context row `row` of `caches` (by
    landscape, as landscapes_of); keep the lowest-energy start per clip (self_verify)."""
    rows = torch.full((starts.shape[1],), row, device=starts.device)  # (N,)
    think = _fixed_steps if thinking.halt_tolerance is None else _halting
    thought = think(model, caches, starts, rows, thinking)  # (B, N, F)
    last = model.args.landscapes - 1
    cache = cache_of(model, caches, last)
    chosen = self_verify(model, thought, cache, rows, last, starts.shape[:2], dim=1)
    verdict = FrameVerdict(chosen.states, chosen.energies, chosen.steps, chosen.passes)
    if hasattr(model, "patch_energies"):  # the chosen frames' energy split by patch
        with torch.no_grad():
            frames = chosen.states.unsqueeze(1)  # (B, 1, F)
            patches = model.patch_energies(cache, frames, rows[:1], last)  # (B, 1, P)
        verdict.patch_energies = patches.squeeze(1)  # (B, P)
    return verdict
