"""System-2 thinking at inference: think longer (more steps), self-verify (best of N by energy).

All N candidates of a position share one context cache: the candidate rows are simply repeated
(`rows`), and since a candidate attends only to the context and itself, the N copies never see
each other. The candidate with the lowest final energy wins, independently per token (the
paper's rule, the default); `Selection` offers two others: the candidates' probabilities averaged
with weights softmax(-E / T) per token ("weighted"), and one candidate index for a whole sequence,
the lowest summed energy ("sequence").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from ebt.config_checks import SELECTION_RULES, SELECTION_TEMPERATURE
from ebt.models import EnergyTransformer, TransformerPP
from ebt.thinking.halting import adaptive_think
from ebt.thinking.loop import InferenceOptions
from ebt.thinking.metrics import perplexity


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
def _final_energies(model: EnergyTransformer, tokens, states, rows, landscape: int):
    cache = model.encode_context(tokens, landscape if model.context_depends_on_landscape else 0)
    return model.energies(cache, model.candidate_input(states), rows, landscape)  # (B, N * S)


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
    candidates: torch.Tensor, energies: torch.Tensor, selection: Selection
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text best-of-N by `selection`: candidates (B, N, S, V) raw logits, energies (B, N, S) ->
    (logits (B, S, V), energies (B, S)). The weighted mixture comes back as log-probabilities
    (valid logits) with the weighted mean energy."""
    if selection.rule == "lowest":
        return select_lowest(candidates, energies, dim=1)
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


def best_of_n(
    model: EnergyTransformer,
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
    final = trajectory.states[-1]  # (B, N * S, V)
    energies = _final_energies(model, tokens, final, rows, trajectory.landscapes[-1])
    energies = energies.view(batch, samples, length)  # (B, N, S)
    candidates = final.view(batch, samples, length, -1)  # (B, N, S, V)
    chosen, lowest = select(candidates, energies, selection or Selection())  # (B, S, V), (B, S)
    passes = thinking_passes(len(trajectory.states), samples, options.evaluations_per_step)
    return Verdict(chosen, lowest, float(passes))


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
    if isinstance(model, TransformerPP):
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
    if tolerance is not None and not isinstance(model, TransformerPP):
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
