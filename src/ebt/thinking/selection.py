"""System-2 thinking at inference: think longer (more steps), self-verify (best of N by energy).

All N candidates of a position share one context cache: the candidate rows are simply repeated
(`rows`), and since a candidate attends only to the context and itself, the N copies never see
each other. The candidate with the lowest final energy wins, independently per token (the
paper's rule, the default); `Selection` offers two others: the candidates' probabilities averaged
with weights softmax(-E / T) per token ("weighted"), and one candidate index for a whole sequence,
the lowest summed energy ("sequence").

`self_verify` is the one best-of-N of every modality (text here, images in
ebt.modalities.image.denoise, video frames in ebt.modalities.video.thinking): final energies,
the selection rule, the steps and passes of the chosen candidate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from ebt.config_checks import SELECTION_RULES, SELECTION_TEMPERATURE
from ebt.thinking.halting import adaptive_think
from ebt.thinking.loop import EnergyModel, InferenceOptions
from ebt.thinking.metrics import perplexity


def thinks(model: torch.nn.Module) -> bool:
    """An energy model (it thinks); a baseline such as Transformer++ predicts in one pass."""
    return callable(getattr(model, "think", None))


@dataclass
class Selection:
    """How best-of-N picks among candidates. lowest: the lowest final energy per token (the
    paper's rule). weighted: the mixture of the candidates' distributions with weights
    softmax(-E / temperature) per token (temperature -> 0: lowest; -> inf: the plain average,
    which by convexity never has a higher loss than the candidates' mean). sequence: the
    candidate index with the lowest energy summed over the sequence's positions."""

    rule: str = SELECTION_RULES[0]
    temperature: float = SELECTION_TEMPERATURE  # energy units

    def __post_init__(self) -> None:
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"selection {self.rule!r}: use one of {', '.join(SELECTION_RULES)}")
        if not self.temperature > 0 or math.isinf(self.temperature):
            raise ValueError(f"selection temperature {self.temperature}: must be > 0 and finite")


@dataclass
class Verdict:
    """The chosen candidates (B, S, V), their final energies (B, S), and the compute spent."""

    logits: torch.Tensor
    energies: torch.Tensor | None
    forward_passes_per_token: float
    steps: torch.Tensor | None = None  # (B, S) steps each token took (adaptive halting)


@torch.no_grad()
def final_energies(
    model: EnergyModel,
    cache: Any,
    states: torch.Tensor,
    rows: torch.Tensor | None = None,
    landscape: int | None = None,
) -> torch.Tensor:
    """The energy of every final state, as verification reads it (one forward, no gradient, no
    Langevin noise): text states (B, R, V) -> (B, R) against the context `cache` at `rows`;
    video frames (B, N, F) -> (B, N); images (B, C, H, W) -> (B,) (cache, rows unused)."""
    return model.energies(cache, model.candidate_input(states), rows, landscape)


def select_lowest(
    candidates: torch.Tensor, energies: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-verification: along `dim` of `energies` (text (B, N, S); images (N, B)), the
    candidate with the lowest energy. `candidates` has the energies' shape followed by the
    candidate's own dims (text (B, N, S, V); images (N, B, C, H, W)). Returns (the chosen
    candidates, `dim` removed, and their energies)."""
    best = energies.argmin(dim=dim, keepdim=True)  # the energies' shape, size 1 along dim
    own = candidates.shape[energies.dim() :]  # the candidate's own dims
    index = best.view(*best.shape, *[1] * len(own)).expand(*best.shape, *own)
    chosen = candidates.gather(dim, index).squeeze(dim)  # dim removed
    return chosen, energies.gather(dim, best).squeeze(dim)


def select(
    candidates: torch.Tensor, energies: torch.Tensor, selection: Selection, dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-of-N by `selection` along `dim` (the samples) of energies, candidates as in
    select_lowest. "lowest" serves every layout; "sequence" and "weighted" read the text
    layout, candidates (B, N, S, V) raw logits and energies (B, N, S), to (logits (B, S, V),
    energies (B, S)): the weighted mixture comes back as log-probabilities (valid logits) with
    the weighted mean energy."""
    if selection.rule == "lowest":
        return select_lowest(candidates, energies, dim)
    if dim != 1 or energies.dim() != 3:
        raise ValueError(f"selection {selection.rule!r} needs text candidates (B, N, S, V)")
    if selection.rule == "sequence":
        best = energies.sum(-1).argmin(1)  # (B,) one candidate index per sequence
        rows = torch.arange(len(best), device=best.device)
        return candidates[rows, best], energies[rows, best]  # (B, S, V), (B, S)
    weights = torch.softmax(-energies.float() / selection.temperature, dim=1)  # (B, N, S)
    log_probs = candidates.float().log_softmax(-1)  # (B, N, S, V)
    mixture = torch.logsumexp(log_probs + weights.clamp_min(1e-30).log()[..., None], dim=1)
    return mixture, (weights * energies).sum(1)  # (B, S, V), (B, S)


def thinking_passes(steps: int, samples: int, evaluations_per_step: int) -> int:
    """Energy evaluations per prediction (token or image) of best-of-`samples` thinking: every
    step of every sample, plus the final-energy evaluation that verification needs to choose
    among samples (with one sample that evaluation only reports the energy, so it is not
    counted as compute spent on the answer)."""
    return steps * evaluations_per_step * samples + (samples if samples > 1 else 0)


@dataclass
class Thought:
    """Candidates after thinking, before verification: final states, the energy evaluations
    each spent, and (adaptive halting) the steps each took, in the energies' layout."""

    states: torch.Tensor
    evaluations: float
    steps: torch.Tensor | None = None


@dataclass
class Chosen:
    """What best-of-N keeps: the chosen states, their final energies, the steps they took
    (when the thought had them), and the energy evaluations spent per prediction."""

    states: torch.Tensor
    energies: torch.Tensor
    steps: torch.Tensor | None
    passes: float


def self_verify(
    model: EnergyModel,
    thought: Thought,
    cache: Any,
    rows: torch.Tensor | None,
    landscape: int | None,
    layout: tuple[int, ...],
    dim: int,
    selection: Selection | None = None,
) -> Chosen:
    """Best-of-N for every modality: the final energies of thought.states (final_energies, on
    `landscape` against `cache` at `rows`), viewed as `layout` with the N samples along `dim`
    (text (B, N, S), dim 1; images (N, B), dim 0; video (B, N), dim 1), the candidate that
    `selection` (default: the lowest energy) picks, its steps, and the passes spent per
    prediction (as thinking_passes: every sample's evaluations, plus N verification forwards
    when N > 1)."""
    energies = final_energies(model, cache, thought.states, rows, landscape)
    own = thought.states.shape[energies.dim() :]  # the candidate's own dims
    energies = energies.view(layout)  # samples along dim
    candidates = thought.states.view(*layout, *own)
    chosen, lowest = select(candidates, energies, selection or Selection(), dim)
    steps = None
    if thought.steps is not None:
        taken = thought.steps.view(layout).unsqueeze(-1).to(energies.dtype)  # (*layout, 1)
        steps = select_lowest(taken, energies, dim)[0].squeeze(-1).long()
    samples = layout[dim]
    passes = thought.evaluations * samples + (samples if samples > 1 else 0)
    return Chosen(chosen, lowest, steps, passes)


def best_of_n(
    model: EnergyModel,
    tokens: torch.Tensor,
    steps: int,
    samples: int,
    options: InferenceOptions | None = None,
    selection: Selection | None = None,
) -> Verdict:
    """Think `steps` per landscape from `samples` random starts; keep the lowest-energy one
    (or choose by another `selection` rule)."""
    options = options or InferenceOptions()
    batch, length = tokens.shape
    rows = torch.arange(length, device=tokens.device).repeat(samples)  # (N * S,)
    init = torch.randn(batch, samples * length, model.vocab_size, device=tokens.device)
    arguments = options.think_arguments()
    trajectory = model.think(tokens, init, steps=steps, rows=rows, **arguments)
    landscape = trajectory.landscapes[-1]
    cache = encode_cache(model, tokens, landscape)
    evaluations = len(trajectory.states) * options.evaluations_per_step
    thought = Thought(trajectory.states[-1], evaluations)  # (B, N * S, V)
    chosen = self_verify(
        model, thought, cache, rows, landscape, (batch, samples, length), 1, selection
    )
    return Verdict(chosen.states, chosen.energies, float(chosen.passes))


def encode_cache(model: EnergyModel, tokens: torch.Tensor, landscape: int) -> Any:
    """The context cache of tokens (B, S) that steps on `landscape` read, encoded afresh."""
    landscape = landscape if model.context_depends_on_landscape else 0
    return model.encode_context(tokens, landscape)


def predict(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    steps: int,
    samples: int,
    tolerance: float | None = None,
    options: InferenceOptions | None = None,
    selection: Selection | None = None,
) -> Verdict:
    """Next-token logits for every position; Transformer++ ignores steps and samples.

    With a tolerance, each token halts on its own (adaptive compute, one sample)."""
    options = options or InferenceOptions()
    if not thinks(model):  # a baseline (Transformer++): one forward pass
        with torch.no_grad():
            return Verdict(model(tokens), None, 1.0)
    if tolerance is not None:
        options.check_halting(tolerance)
        result = adaptive_think(
            model,
            tokens,
            steps,
            tolerance,
            step_size=options.step_size,
            langevin_noise=options.langevin_noise,
        )
        passes = result.forward_passes_per_token
        return Verdict(result.logits, result.energies, passes, result.steps)
    return best_of_n(model, tokens, steps, samples, options, selection)


def _token_losses(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    flat = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return flat.view_as(targets).masked_fill(targets == pad_id, float("nan"))  # (B, S)


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for `positives` (ties count half), from ranks:
    (sum of the positives' mid-ranks - P(P+1)/2) / (P N), in O(n log n)."""
    count, positive = len(scores), int(positives.sum())
    negative = count - positive
    if not positive or not negative:
        return float("nan")
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of each distinct value's last copy
    mid_ranks = (ends - (counts - 1) / 2)[inverse]  # (n,) tied scores share their mean rank
    rank_sum = float(mid_ranks[positives].sum())
    return (rank_sum - positive * (positive + 1) / 2) / (positive * negative)


def uncertainty(energy: torch.Tensor, loss: torch.Tensor, wrong: torch.Tensor) -> dict:
    """How well the final energy flags mistakes: AUROC for "top-1 wrong", correlation with loss."""
    keep = ~torch.isnan(loss)
    energy, loss, wrong = energy[keep].double(), loss[keep].double(), wrong[keep]
    correlation = torch.corrcoef(torch.stack((energy, loss)))[0, 1]
    return {
        "energy_auroc_wrong": auroc(energy, wrong),
        "energy_loss_correlation": float(correlation),
        "top1_error": float(wrong.float().mean()),
        "tokens": len(energy),
    }


def thinking_curves(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    steps_list: list[int],
    samples_list: list[int],
    pad_id: int = 0,
    seed: int = 0,
    tolerance: float | None = None,
    options: InferenceOptions | None = None,
    selection: Selection | None = None,
) -> dict[str, Any]:
    """Loss / perplexity for every (steps, samples) pair, plus per-token energy and loss of the
    last pair (for energy-vs-loss plots and uncertainty metrics). With a tolerance, also an
    adaptive point per steps value (`"adaptive": true`, steps = the per-landscape budget)."""
    batches = list(batches)
    curves, last_tokens = [], {}
    for steps in steps_list:
        for samples in samples_list:
            torch.manual_seed(seed)
            point, last_tokens = _evaluate_point(
                model, batches, steps, samples, pad_id, options, selection=selection
            )
            curves.append(point)
    adaptive_tokens = {}
    if tolerance is not None and thinks(model):
        for steps in steps_list:
            torch.manual_seed(seed)
            point, adaptive_tokens = _evaluate_point(
                model, batches, steps, 1, pad_id, options, tolerance
            )
            curves.append(point | {"adaptive": True, "tolerance": tolerance})
    result: dict[str, Any] = {"curves": curves, "options": vars(options or InferenceOptions())}
    result["selection"] = vars(selection or Selection())
    result["tokens"] = last_tokens
    if last_tokens.get("energy") is not None:
        measures = {key: last_tokens[key] for key in ("energy", "loss", "wrong")}
        result["uncertainty"] = uncertainty(**measures)
    if adaptive_tokens:  # do the tokens that think longer err more often?
        keep = ~torch.isnan(adaptive_tokens["loss"])
        steps, wrong = adaptive_tokens["steps"][keep], adaptive_tokens["wrong"][keep]
        result["uncertainty"]["steps_auroc_wrong"] = auroc(steps.double(), wrong)
        result["adaptive_tokens"] = adaptive_tokens
    return result


def _evaluate_point(
    model, batches, steps, samples, pad_id, options=None, tolerance=None, selection=None
):
    losses, energies, wrong, taken, passes = [], [], [], [], 0.0
    for batch in batches:
        verdict = predict(model, batch[:, :-1], steps, samples, tolerance, options, selection)
        losses.append(_token_losses(verdict.logits, batch[:, 1:], pad_id).flatten())
        wrong.append((verdict.logits.argmax(-1) != batch[:, 1:]).flatten())
        if verdict.energies is not None:
            energies.append(verdict.energies.flatten())
        if verdict.steps is not None:
            taken.append(verdict.steps.flatten())
        passes = verdict.forward_passes_per_token
    token_losses = torch.cat(losses)
    mean = float(token_losses.nanmean())
    point = {
        "steps": steps,
        "samples": samples,
        "loss": mean,
        "ppl": perplexity(mean),
        "forward_passes_per_token": passes,
    }
    tokens = {
        "loss": token_losses,
        "wrong": torch.cat(wrong),
        "energy": torch.cat(energies) if energies else None,
        "steps": torch.cat(taken) if taken else None,
    }
    return point, tokens
