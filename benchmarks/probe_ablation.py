"""The paper's Table 2 analogue on our Dyck probe: % answer-perplexity improvement from thinking
longer and from thinking longer plus self-verification, out of distribution, for the full
System-2 recipe and with each of its tricks removed.

    OMP_NUM_THREADS=1 python benchmarks/probe_ablation.py [--config configs/text/dyck-tiny.toml]
        [--out runs/ablation] [--steps 1,2,4,8] [--samples 1,4] [--problems 256] [--json]
        [--selection lowest|weighted|sequence] [--selection-temperature T] [key=value ...]

Each variant is `ebt train CONFIG` with one override (a run directory per variant under --out;
one that already finished is reused, so the command resumes), then `ebt probe` on the same
problems. "Thinking longer" is the fewest -> the most steps with one candidate, "longer +
verification" the most steps with the most candidates, both against the fewest steps with one
candidate (the columns of `ebt probe`'s `gains`). Extra key=value overrides apply to every
variant (e.g. train.max_steps=300 for a quicker table).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

VARIANTS = {
    "full System-2 recipe": [],
    "no random step size": ["think.step_size_random_scale=1.0"],
    "no random #steps": ["think.random_steps=0", "think.steps=3"],  # 3: what S2 evaluates with
    "no Langevin noise": ["think.langevin_noise=0.0"],
    "no replay buffer": ["think.replay_buffer=false"],
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def train_variant(config: str, out: Path, overrides: list[str]) -> Path:
    """Train (or finish, or reuse) one variant's run directory."""
    from ebt.cli.main import main

    arguments = ["train", config, *overrides, f"train.out_dir={out}", "train.progress=false"]
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the table
        status = main(arguments)
    if status != 0:
        raise SystemExit(f"training {out} failed")
    return out


def probe_variant(run: Path, args: argparse.Namespace) -> dict:
    from ebt.cli.probe import ProbeCommand, probe_run
    from ebt.modalities.text.probe import ProbeRequest
    from ebt.thinking.loop import InferenceOptions

    measure = ProbeRequest(args.steps, args.samples, args.problems, 64, 0, InferenceOptions())
    command = ProbeCommand("dyck", "", measure, args.selection, args.selection_temperature)
    return probe_run(str(run), [], command)


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| config | thinking longer (ood) | longer + verification (ood) | same, in distribution |",
        "|---|---|---|---|",
    ]
    for name, result in rows.items():
        ood, inside = result["gains"]["ood"], result["gains"]["in"]
        lines.append(
            f"| {name} | {ood['thinking_longer_pct']:+.1f}% | {ood['longer_and_verify_pct']:+.1f}%"
            f" | {inside['thinking_longer_pct']:+.1f}% / {inside['longer_and_verify_pct']:+.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--config", default="configs/text/dyck-tiny.toml")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--steps", default="1,2,4,8")
    parser.add_argument("--samples", default="1,4")
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--selection", default="lowest", choices=["lowest", "weighted", "sequence"])
    parser.add_argument("--selection-temperature", type=float, default=0.1)
    args = parser.parse_args()
    args.steps = [int(k) for k in args.steps.split(",")]
    args.samples = [int(n) for n in args.samples.split(",")]
    rows = {}
    for name, overrides in VARIANTS.items():
        run = train_variant(args.config, Path(args.out) / _slug(name), overrides + args.overrides)
        rows[name] = probe_variant(run, args)
    if args.json:
        print(json.dumps(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
