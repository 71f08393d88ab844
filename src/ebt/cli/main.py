"""The `ebt` command line: train, eval, generate, think, denoise, bench, tokenizer, and the
interop commands (import-reference, export-reference, push). Argument types live in cli_args,
`ebt denoise` in denoise_cli."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ebt.cli.args import (
    COUNT,
    INT_0,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    STEPS_LIST,
    STOP,
    TOP_P,
    add_run_parser,
    add_selection_options,
    add_thinking_options,
    at_least,
    print_json,
    selection_options,
    thinking_options,
)
from ebt.cli.denoise import add_denoise_command
from ebt.cli.probe import add_probe_command
from ebt.cli.rollout import add_rollout_command
from ebt.config import ConfigError, load_config
from ebt.errors import EbtError, MachineError, machine_cause
from ebt.outputs import DIRECTORY, JSONL, PNG, Output, atomic_path, check_outputs, write_text
from ebt.runtime import keep_freed_memory
from ebt.thinking.loop import ThinkingError

# Errors caused by what the user typed or pointed at: one line, exit status 2, no traceback.
USER_ERRORS = (EbtError, ThinkingError, FileNotFoundError, PermissionError)
USER_ERRORS += (FileExistsError, IsADirectoryError, NotADirectoryError)
BPE_MIN_VOCAB = 257  # the 256 byte-level symbols plus the end token (see data.tokenizers)


def cmd_train(args: argparse.Namespace) -> int:
    from ebt.training.distributed import is_main_process
    from ebt.training.trainer import train

    config = load_config(args.config, args.overrides)
    result = train(config)
    if not is_main_process():  # under torchrun only rank 0 prints
        return 0
    if args.json:
        print_json(result)
    else:
        print(f"run: {config.train.out_dir}")
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ebt.api import load_run
    from ebt.data import iter_eval_batches
    from ebt.modalities import modality_for
    from ebt.training.evaluate import evaluate
    from ebt.training.objective import Objective

    run = load_run(args.run, args.overrides)
    train = run.config.train
    modality = modality_for(run.config, run.tokenizer)
    dataset = modality.dataset(args.split)  # ood: text the ood_source; images ood_noise_level
    batches = iter_eval_batches(dataset, train.batch_size, args.batches or train.eval_batches)
    objective = Objective(run.model, run.config.think, task=modality.task(args.split))
    device = next(run.model.parameters()).device
    result = {"split": args.split, "checkpoint": str(run.checkpoint)}
    result |= evaluate(objective, batches, device, seed=train.seed)
    print_json(result) if args.json else print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ebt.api import load_run
    from ebt.modalities.text.generate import Sampling, generate

    thinking = thinking_options(args)  # invalid combinations fail before any loading
    run = load_run(args.run, args.overrides, modality="text", verb="ebt generate")
    if args.graphs and args.halt_tolerance is not None:
        raise ConfigError("--graphs does not combine with --halt-tolerance")
    sampling = Sampling(
        args.temperature,
        args.top_k,
        args.top_p,
        args.steps,
        thinking,
        args.halt_tolerance,
        args.graphs,
    )
    records: list[dict[str, Any]] = []
    pieces = generate(
        run, args.prompt, args.max_new_tokens, sampling, args.seed, args.stop, records
    )
    if args.json:
        text = "".join(pieces)
        for record in records:
            record["text"] = run.tokenizer.decode([record["id"]])
        print_json({"prompt": args.prompt, "text": text, "tokens": records})
        return 0
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _write_token_records(path: str, result: dict[str, Any]) -> None:
    """One JSON line per (non-pad) token of the last curve point: loss, top-1 wrong, final
    energy, and with adaptive halting that point's steps taken and energy."""
    import torch

    columns = {
        name: values for name, values in result.get("tokens", {}).items() if values is not None
    }
    for name, values in result.get("adaptive_tokens", {}).items():
        if name in ("steps", "energy") and values is not None:
            columns[f"adaptive_{name}"] = values
    keep = ~torch.isnan(columns["loss"])
    rows = {name: values[keep].tolist() for name, values in columns.items()}
    lines = [
        json.dumps({name: rows[name][index] for name in rows}) for index in range(len(rows["loss"]))
    ]
    write_text(path, "".join(line + "\n" for line in lines))


def cmd_think(args: argparse.Namespace) -> int:
    from ebt.api import load_run
    from ebt.data import build_token_dataset, iter_eval_batches
    from ebt.plots import plot_thinking
    from ebt.thinking.selection import thinking_curves

    options = thinking_options(args)  # invalid combinations fail before any loading
    outputs = [Output("--plot", args.plot, PNG), Output("--tokens", args.tokens, JSONL)]
    check_outputs(outputs)  # and so do output paths
    run = load_run(args.run, args.overrides, modality="text", verb="ebt think")
    data = run.config.data
    source = args.data or (data.ood_source if args.split == "ood" else None)
    split = "all" if source else args.split
    dataset = build_token_dataset(data, run.tokenizer, split, source=source)
    batches = iter_eval_batches(dataset, run.config.train.batch_size, args.batches)
    result = thinking_curves(
        run.model,
        batches,
        args.steps,
        args.samples,
        run.tokenizer.pad_id,
        args.seed,
        args.halt_tolerance,
        options,
        selection_options(args, run.config.think),
    )
    if args.plot:
        with atomic_path(args.plot) as temporary:
            plot_thinking(result, temporary, title=f"{run.checkpoint} ({source or split})")
    if args.tokens:
        _write_token_records(args.tokens, result)  # atomic
    result.pop("tokens", None)
    result.pop("adaptive_tokens", None)
    result |= {"split": source or split, "checkpoint": str(run.checkpoint)}
    result |= {name: path for name, path in (("plot", args.plot), ("tokens", args.tokens)) if path}
    print_json(result) if args.json else print(json.dumps(result, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ebt.training.bench import GRAPH_WARMUP_TOKENS, bench_generate, bench_train

    config = load_config(args.config, args.overrides)
    limit = config.data.seq_len - (GRAPH_WARMUP_TOKENS - 1 if args.graphs else 0)
    if args.what == "generate" and args.new_tokens >= limit:
        graphs = " minus 3 with --graphs (warm-up tokens)" if args.graphs else ""
        raise ConfigError(
            f"--new-tokens={args.new_tokens}: must be below data.seq_len="
            f"{config.data.seq_len}{graphs}"
        )
    if args.what == "generate":
        result = bench_generate(config, args.new_tokens, args.repeats, args.graphs)
    else:
        if config.train.compile:
            print(
                "ebt bench: train.compile=true: the warm-up steps compile the models (about a "
                "minute each on CPU the first time)",
                file=sys.stderr,
            )
        result = bench_train(config, args.vs_baseline, args.repeats, args.warmup)
    if args.json:
        print_json(result)
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from ebt.configs import PRESET_ROOT, preset_names, preset_summary

    names = preset_names()
    if args.json:
        print_json({name: str(PRESET_ROOT / f"{name}.toml") for name in names})
        return 0
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {preset_summary(name)}")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from ebt.data import tokenizer_train_command

    check_outputs([Output("--out", args.out, DIRECTORY)])  # before reading any text
    path = tokenizer_train_command(args.source, args.vocab_size, args.out, args.max_documents)
    print(f"wrote tokenizer: {path}")
    return 0


def _add_train_and_eval(sub: Any) -> None:
    train = sub.add_parser("train", help="train (or resume) a run")
    train.add_argument("config", help="a preset name (text/tiny; `ebt presets`) or a TOML file")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    train.add_argument("--json", action="store_true", help="print the final evaluation as JSON")
    train.set_defaults(handler=cmd_train)

    evaluate = add_run_parser(sub, "eval", cmd_eval, "evaluate a trained run")
    evaluate.add_argument("--split", default="val", choices=["val", "train", "ood"])
    evaluate.add_argument("--batches", type=INT_0, default=0, help="0: train.eval_batches")
    evaluate.add_argument("--json", action="store_true")


def _add_inference(sub: Any) -> None:
    generate = add_run_parser(sub, "generate", cmd_generate, "generate text from a prompt")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=COUNT, default=200)
    generate.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0: greedy")
    generate.add_argument("--top-k", type=INT_0, default=0, help="0: off")
    generate.add_argument("--top-p", type=TOP_P, default=1.0, help="nucleus in (0, 1]; 1: off")
    generate.add_argument(
        "--stop",
        action="append",
        type=STOP,
        default=[],
        help=r"stop string (repeatable); \n, \t and \\ are a newline, a tab and a backslash",
    )
    generate.add_argument("--seed", type=SEED, default=0)
    generate.add_argument("--steps", type=COUNT, default=None, help="EBT steps per landscape")
    add_thinking_options(generate)
    generate.add_argument(
        "--halt-tolerance",
        type=POSITIVE,
        default=None,
        help="EBT: a token stops thinking when its energy moves less than this (steps: budget)",
    )
    generate.add_argument(
        "--graphs",
        action="store_true",
        help="run each token's decoding step as one compiled graph at fixed shapes "
        "(CUDA graphs on CUDA; the first tokens pay the compilation)",
    )
    generate.add_argument(
        "--json",
        action="store_true",
        help="print the text and, per token, its id, energy (EBT: of the state the last "
        "thinking step started from) and thinking steps taken, as one JSON object",
    )


def _add_think(sub: Any) -> None:
    think = add_run_parser(sub, "think", cmd_think, "thinking curves: loss per steps x samples")
    think.add_argument(
        "--steps", type=STEPS_LIST, default=[1, 2, 4, 8], help="steps per landscape, e.g. 1,2,4,8"
    )
    think.add_argument(
        "--samples", type=STEPS_LIST, default=[1, 4], help="best-of-N values, e.g. 1,4"
    )
    think.add_argument("--split", default="val", choices=["val", "train", "ood"])
    think.add_argument("--data", default="", help="text files/globs to evaluate instead")
    think.add_argument("--batches", type=INT_0, default=8, help="0: all")
    think.add_argument("--seed", type=SEED, default=0)
    think.add_argument("--plot", default="", help="write the curves to this PNG")
    think.add_argument(
        "--halt-tolerance",
        type=POSITIVE,
        default=None,
        help="also run adaptive thinking: a token stops when its energy moves less than this",
    )
    add_thinking_options(think)
    add_selection_options(think)
    think.add_argument("--tokens", default="", help="write per-token records to this JSONL file")
    think.add_argument("--json", action="store_true")


def _add_tools(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmark training steps or generation")
    bench.add_argument("what", choices=["train", "generate"])
    bench.add_argument("config")
    bench.add_argument("overrides", nargs="*")
    bench.add_argument("--vs-baseline", action="store_true", help="also time Transformer++")
    bench.add_argument("--repeats", type=COUNT, default=10)
    bench.add_argument("--new-tokens", type=COUNT, default=16, help="generate: tokens per run")
    bench.add_argument(
        "--graphs", action="store_true", help="generate: also time `ebt generate --graphs`"
    )
    bench.add_argument("--warmup", type=INT_0, default=2)
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(handler=cmd_bench)

    presets = sub.add_parser("presets", help="list the shipped config presets (ebt train NAME)")
    presets.add_argument("--json", action="store_true", help="name -> file path")
    presets.set_defaults(handler=cmd_presets)

    tokenizer = sub.add_parser("tokenizer", help="tokenizer tools")
    tokenizer.add_argument("action", choices=["train"])
    tokenizer.add_argument("--source", default="stdlib")
    tokenizer.add_argument("--vocab-size", type=at_least(BPE_MIN_VOCAB, int), default=4096)
    tokenizer.add_argument("--out", required=True, help="output directory")
    tokenizer.add_argument("--max-documents", type=INT_0, default=0, help="0: all")
    tokenizer.set_defaults(handler=cmd_tokenizer)


def build_parser() -> argparse.ArgumentParser:
    from ebt.cli.experiment import add_experiment_commands
    from ebt.cli.interop import add_interop_commands

    parser = argparse.ArgumentParser(prog="ebt", description="Energy-Based Transformers")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (or EBT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_and_eval(sub)
    _add_inference(sub)
    _add_think(sub)
    add_denoise_command(sub)
    add_rollout_command(sub)  # video rollout
    add_probe_command(sub)  # reasoning probes: dyck, arithmetic
    _add_tools(sub)
    add_interop_commands(sub)  # import-reference, export-reference, push
    add_experiment_commands(sub)  # experiment scaling|thinking-shift, report
    return parser


def _debugging(args: argparse.Namespace) -> bool:
    """`ebt --debug ...` or EBT_DEBUG set (to anything but 0 / false / no / off)."""
    flag = os.environ.get("EBT_DEBUG", "").strip().lower()
    return args.debug or flag not in ("", "0", "false", "no", "off")


def _report(error: BaseException) -> int:
    """Print a user error as one line on stderr; its exit status (2 unless it carries one)."""
    code = getattr(error, "exit_code", 2)
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"ebt: error: {message}" if code == 2 else f"ebt: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the `ebt` command line; user errors print one line and return 2 (130: Ctrl-C)."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        if _debugging(args):
            raise
        return _report(error)
    except KeyboardInterrupt:
        if _debugging(args):
            raise
        print("ebt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ebt presets | head`: the reader left early; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 141  # 128 + SIGPIPE, as a shell reports it
    except OSError as error:  # a full disk, a read-only filesystem: one line, not a traceback
        cause = machine_cause(error)
        if cause is None or _debugging(args):
            raise
        return _report(MachineError(f"cannot write {error.filename or 'a file'}: {cause}"))
