"""Why does self-verification (best of N by energy) help or hurt? Measures for a trained EBT run.

    OMP_NUM_THREADS=1 python benchmarks/verification_study.py RUN [--data val|ood|pydoc|PATH]
        [--steps 1,2,4,8] [--samples 8] [--batches 8] [--langevin-noise SIGMA] [--json]

N candidates per position think `max(steps)` steps from independent N(0, 1) starts (one run:
the state after k steps is the state a k-step run reaches with the same draws); after each
k in --steps every candidate's final energy (the noise-free state, as best_of_n scores it), its
token loss, entropy and top-1 correctness are recorded. Reported per k, for n = 1, 2, 4, ..., N:

- loss of the candidates on average (best of 1), of the lowest-energy one (the paper's rule),
  of the lowest-loss one (the oracle: the ceiling of any selection), of the per-sequence choice
  (one candidate index for a whole sequence, the lowest summed energy), of the plain average of
  the candidates' probabilities, and of the energy-weighted average (weights softmax(-E / T));
- how energy ranks candidates of one position (pairwise concordance with the loss; 0.5 is a
  coin) versus positions against each other (AUROC of the chosen energy for a wrong top-1,
  correlation of energy and loss across positions);
- the chosen candidate against the others: entropy, energy gap, and the diversity of the
  candidates (mean total-variation distance between two candidates of one position).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from ebt.api import load_run
from ebt.data import build_token_dataset, iter_eval_batches
from ebt.thinking.selection import auroc, encode_cache, final_energies


def _candidates(model, tokens, steps: list[int], samples: int, noise) -> dict[int, tuple]:
    """{k: (logits (B, N, S, V), energies (B, N, S))} after k steps per landscape of N
    candidates. One landscape: one run of max(steps), read after each k (a k-step run is its
    prefix); several landscapes (System 1): one run per k from the same starts."""
    batch, length = tokens.shape
    rows = torch.arange(length).repeat(samples)  # (N * S,)
    init = torch.randn(batch, samples * length, model.vocab_size)  # (B, N * S, V)
    one_landscape = model.args.landscapes == 1
    if one_landscape:
        trajectory = model.think(tokens, init, steps=max(steps), rows=rows, langevin_noise=noise)
    result = {}
    for k in steps:
        if not one_landscape:
            trajectory = model.think(tokens, init, steps=k, rows=rows, langevin_noise=noise)
        index = k - 1 if one_landscape else -1
        state, landscape = trajectory.states[index], trajectory.landscapes[index]
        cache = encode_cache(model, tokens, landscape)
        energies = final_energies(model, cache, state, rows, landscape)  # (B, N * S)
        shape = (batch, samples, length)
        result[k] = (state.view(*shape, -1), energies.view(shape))
    return result


def _mixture_loss(log_probs, targets, weights) -> torch.Tensor:
    """-log sum_n w_n p_n(target): (B, S) loss of a weighted mixture of the candidates."""
    picked = log_probs.gather(-1, targets[:, None, :, None].expand(-1, log_probs.shape[1], -1, 1))
    return -torch.logsumexp(picked.squeeze(-1) + weights.clamp_min(1e-30).log(), dim=1)


def _measure(logits, energies, targets, keep, temperatures) -> dict[str, float]:
    """Every measure for one (k, n): logits (B, n, S, V), energies (B, n, S)."""
    log_probs = logits.float().log_softmax(-1)  # (B, n, S, V)
    expanded = targets[:, None].expand(-1, logits.shape[1], -1)  # (B, n, S)
    loss = -log_probs.gather(-1, expanded[..., None]).squeeze(-1)  # (B, n, S)
    wrong = log_probs.argmax(-1) != expanded  # (B, n, S)
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, n, S)
    chosen = energies.argmin(1, keepdim=True)  # (B, 1, S)
    pick = lambda values: values.gather(1, chosen).squeeze(1)[keep]  # noqa: E731
    sequence = (energies * keep[:, None]).sum(-1).argmin(1)  # (B,) one index per sequence
    by_sequence = loss[torch.arange(len(loss)), sequence][keep]
    n = logits.shape[1]
    uniform = torch.full_like(energies, 1 / n)  # (B, n, S)
    result = {
        "loss_mean_candidate": float(loss.mean(1)[keep].mean()),
        "loss_lowest_energy": float(pick(loss).mean()),
        "loss_oracle": float(loss.min(1).values[keep].mean()),
        "loss_per_sequence": float(by_sequence.mean()),
        "loss_average_probs": float(_mixture_loss(log_probs, targets, uniform)[keep].mean()),
        "top1_error_mean_candidate": float(wrong.float().mean(1)[keep].mean()),
        "top1_error_lowest_energy": float(pick(wrong).float().mean()),
        "entropy_chosen": float(pick(entropy).mean()),
        "entropy_mean_candidate": float(entropy.mean(1)[keep].mean()),
        "energy_auroc_wrong": auroc(pick(energies).double(), pick(wrong)),
        "energy_loss_correlation": float(
            torch.corrcoef(torch.stack((pick(energies).double(), pick(loss).double())))[0, 1]
        ),
    }
    for temperature in temperatures:
        weights = torch.softmax(-energies / temperature, dim=1)  # (B, n, S)
        mixed = _mixture_loss(log_probs, targets, weights)[keep]
        result[f"loss_energy_weighted_T{temperature:g}"] = float(mixed.mean())
    if n > 1:
        result |= _pairwise(log_probs, loss, energies, keep)
    return result


def _pairwise(log_probs, loss, energies, keep) -> dict[str, float]:
    """Within one position: does lower energy mean lower loss (pairs of candidates), how far
    apart are the candidates, and how large is the energy spread compared with across positions."""
    first, second = torch.triu_indices(loss.shape[1], loss.shape[1], 1)
    energy_order = energies[:, first] < energies[:, second]  # (B, pairs, S)
    loss_order = loss[:, first] < loss[:, second]
    concordant = (energy_order == loss_order).float().mean(1)[keep]
    probs = log_probs.exp()
    distance = 0.5 * (probs[:, first] - probs[:, second]).abs().sum(-1).mean(1)[keep]  # TV
    within = energies.std(1)[keep].mean()
    across = energies.mean(1)[keep].std()
    return {
        "pairwise_concordance": float(concordant.mean()),
        "candidate_tv_distance": float(distance.mean()),
        "energy_std_within_position": float(within),
        "energy_std_across_positions": float(across),
        "energy_gap_chosen_vs_mean": float(
            (energies.min(1).values - energies.mean(1))[keep].mean()
        ),
    }


def study(run, batches, steps, samples, noise, temperatures) -> dict:
    sizes = [n for n in (1, 2, 4, 8, 16, 32) if n <= samples]
    rows: dict[tuple[int, int], list[dict]] = {}
    for tokens in batches:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        keep = targets != run.tokenizer.pad_id  # (B, S)
        for k, (logits, energies) in _candidates(run.model, inputs, steps, samples, noise).items():
            for n in sizes:
                measures = _measure(logits[:, :n], energies[:, :n], targets, keep, temperatures)
                rows.setdefault((k, n), []).append(measures)
    return [
        {"steps": k, "samples": n}
        | {key: sum(m[key] for m in ms) / len(ms) for key in ms[0] if not math.isnan(ms[0][key])}
        for (k, n), ms in rows.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--data", default="val", help="val, ood (the run's ood_source) or a source")
    parser.add_argument("--steps", default="1,2,4,8")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--langevin-noise", type=float, default=None)
    parser.add_argument("--temperatures", default="0.1,1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = load_run(args.run)
    data = run.config.data
    if args.data == "val":
        dataset = build_token_dataset(data, run.tokenizer, "val")
    else:
        source = data.ood_source if args.data == "ood" else args.data
        dataset = build_token_dataset(data, run.tokenizer, "all", source=source)
    torch.manual_seed(args.seed)
    batches = list(iter_eval_batches(dataset, run.config.train.batch_size, args.batches))
    steps = [int(k) for k in args.steps.split(",")]
    temperatures = [float(t) for t in args.temperatures.split(",")]
    points = study(run, batches, steps, args.samples, args.langevin_noise, temperatures)
    print(json.dumps({"run": args.run, "data": args.data, "points": points}))


if __name__ == "__main__":
    main()
