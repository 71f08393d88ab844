"""Reasoning probes of a trained run: answer-token perplexity and exact match, thinking x verifying.

A probe set is problems of one generated probe (`ebt.data.probes`: Dyck, arithmetic), each
written as `[end] prompt answer`: the end-of-document id first (as in the packed training
stream, where every problem follows one), then the prompt ("([{=", "12+7=") and the answer with
its closing newline. The model reads the whole line teacher-forced and only the answer's tokens
are scored: the answer loss is the mean cross-entropy over answer tokens, and a problem is an
exact match when the argmax of every answer position is the right token. That is exactly
"greedy decoding from the prompt reproduces the answer": a position's prediction depends only on
the tokens before it (and, for an EBT, on its own initial noise), so if every teacher-forced
argmax is right, the greedy continuation is the answer, token by token, and conversely.

Every (steps, samples) point is measured in distribution (problems of the run's probe spec in
the validation split, never trained on) and out of distribution (the spec's `ood` version:
longer and deeper Dyck prefixes, more digits), with the compute it cost: energy evaluations per
token (as `ebt think` counts them) and FLOPs per token counted by torch's FlopCounterMode.
A Transformer++ run ignores steps and samples: one forward pass, its flat line.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from ebt.data import DataError, Tokenizer
from ebt.data import probes as probe_data
from ebt.models import TransformerPP
from ebt.thinking.loop import InferenceOptions
from ebt.thinking.metrics import perplexity
from ebt.thinking.selection import Selection, auroc, predict


@dataclass
class ProbeSet:
    """Encoded problems: inputs and targets (P, L) right-padded, answer_mask (P, L) marks the
    target positions that belong to the answer (the only ones scored)."""

    split: str  # "in" or "ood"
    source: str  # the canonical source string of the problems
    inputs: torch.Tensor  # (P, L) long
    targets: torch.Tensor  # (P, L) long
    answer_mask: torch.Tensor  # (P, L) bool

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), size):
            rows = slice(start, start + size)
            yield self.inputs[rows], self.targets[rows], self.answer_mask[rows]


@dataclass
class ProbeRequest:
    """What to measure: thinking steps x best-of-N samples, on how many problems."""

    steps: list[int]
    samples: list[int]
    problems: int = 256
    batch_size: int = 64
    seed: int = 0
    options: InferenceOptions | None = None
    selection: Selection | None = None


def encode_problems(
    problems: list[probe_data.Problem], tokenizer: Tokenizer, seq_len: int, split: str, source: str
) -> ProbeSet:
    """The problems as teacher-forced rows `[end] prompt answer` (prompt and answer encoded
    apart, so the boundary is exact for any tokenizer); fails in one line when a problem is
    longer than the model's `seq_len`."""
    if not problems:
        raise DataError(f"probe '{source}' ({split}): no problems; raise its count")
    rows, starts = [], []
    for problem in problems:
        prompt = [tokenizer.pad_id, *tokenizer.encode(problem.prompt)]
        rows.append(prompt + list(tokenizer.encode(problem.answer)))
        starts.append(len(prompt) - 1)  # target index of the answer's first token
    longest = max(len(row) for row in rows) - 1
    if longest > seq_len:
        raise DataError(
            f"probe '{source}' ({split}): a problem of {longest} tokens exceeds the run's "
            f"data.seq_len={seq_len}; use shorter problems (max_length / ood_length / digits)"
        )
    sequences = torch.full((len(rows), longest + 1), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for index, (row, start) in enumerate(zip(rows, starts, strict=True)):
        sequences[index, : len(row)] = torch.tensor(row)
        mask[index, start : len(row) - 1] = True
    return ProbeSet(split, source, sequences[:, :-1], sequences[:, 1:], mask)


def probe_sets(
    spec: probe_data.Spec, tokenizer: Tokenizer, seq_len: int, count: int, val_fraction: float
) -> dict[str, ProbeSet]:
    """In distribution: the first `count` validation problems of `spec` (never trained on);
    out of distribution: the first `count` problems of its `ood` version."""
    inside = probe_data.problems(spec, "val", val_fraction)[:count]
    outside = list(probe_data.generate(probe_data.replace(spec, ood=True, count=count)))
    ood_source = probe_data.source_string(probe_data.ood_version(spec))
    return {
        "in": encode_problems(inside, tokenizer, seq_len, "in", probe_data.source_string(spec)),
        "ood": encode_problems(outside, tokenizer, seq_len, "ood", ood_source),
    }


def score(
    logits: torch.Tensor, targets: torch.Tensor, answer_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per answer token: loss (A,) and top-1 wrong (A,); per problem: exact match (P,).
    logits (P, L, V), targets and answer_mask (P, L); positions outside the answer are ignored."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    wrong = logits.argmax(-1) != targets  # (P, L)
    exact = ~(wrong & answer_mask).any(-1)  # (P,)
    return losses.view_as(targets)[answer_mask], wrong[answer_mask], exact


def measure_point(
    model: torch.nn.Module, probe_set: ProbeSet, steps: int, samples: int, request: ProbeRequest
) -> dict[str, Any]:
    """Answer loss / perplexity, exact match and compute of one (steps, samples) point."""
    torch.manual_seed(request.seed)
    losses, wrong, exact, energies, passes = [], [], [], [], 1.0
    counter, positions = FlopCounterMode(display=False), 0
    with counter:
        for inputs, targets, mask in probe_set.batches(request.batch_size):
            verdict = predict(
                model, inputs, steps, samples, None, request.options, request.selection
            )
            loss, miss, hit = score(verdict.logits, targets, mask)
            losses.append(loss)
            wrong.append(miss)
            exact.append(hit)
            if verdict.energies is not None:
                energies.append(verdict.energies[mask])  # (A,) final energy of the answer
            passes, positions = verdict.forward_passes_per_token, positions + inputs.numel()
    answer_loss = float(torch.cat(losses).double().mean())
    point = {
        "split": probe_set.split,
        "steps": steps,
        "samples": samples,
        "answer_loss": answer_loss,
        "answer_ppl": perplexity(answer_loss),
        "exact_match": float(torch.cat(exact).double().mean()),
        "forward_passes_per_token": passes,
        "flops_per_token": counter.get_total_flops() / positions,
    }
    if energies:  # does the final energy flag the wrong answer tokens?
        point["energy_auroc_wrong"] = auroc(torch.cat(energies).double(), torch.cat(wrong))
    return point


def percent_gain(before: float, after: float) -> float:
    """Perplexity improvement in percent (positive: `after` is lower)."""
    return 100.0 * (before - after) / before


def gains(points: list[dict[str, Any]], steps: list[int], samples: list[int]) -> dict[str, Any]:
    """The paper's Table 2 columns per split: % answer-perplexity improvement of thinking longer
    (fewest -> most steps, fewest samples) and of thinking longer plus self-verification (most
    steps, most samples), both against the fewest steps with the fewest samples."""
    table: dict[str, Any] = {}
    for split in dict.fromkeys(point["split"] for point in points):
        ppl = {(p["steps"], p["samples"]): p["answer_ppl"] for p in points if p["split"] == split}
        base = ppl[(min(steps), min(samples))]
        table[split] = {
            "thinking_longer_pct": percent_gain(base, ppl[(max(steps), min(samples))]),
            "longer_and_verify_pct": percent_gain(base, ppl[(max(steps), max(samples))]),
        }
    return table


def run_probe(
    model: torch.nn.Module, sets: dict[str, ProbeSet], request: ProbeRequest
) -> dict[str, Any]:
    """Every (steps, samples) point on every probe set, and the Table 2 gains. A Transformer++
    is measured once per set and that point repeated (it cannot think: its flat line)."""
    points = []
    for probe_set in sets.values():
        flat = None
        for steps in request.steps:
            for samples in request.samples:
                if isinstance(model, TransformerPP):
                    flat = flat or measure_point(model, probe_set, 1, 1, request)
                    points.append(flat | {"steps": steps, "samples": samples})
                else:
                    points.append(measure_point(model, probe_set, steps, samples, request))
    return {
        "kind": "transformer_pp" if isinstance(model, TransformerPP) else "ebt",
        "problems": {name: len(probe_set) for name, probe_set in sets.items()},
        "sources": {name: probe_set.source for name, probe_set in sets.items()},
        "curves": points,
        "gains": gains(points, request.steps, request.samples),
    }
