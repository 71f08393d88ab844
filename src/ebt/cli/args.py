"""Argument types and shared options of the `ebt` command line: every value is checked when
it is parsed, so a bad flag fails at once with argparse's one-line usage error (exit 2)."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from typing import Any

from ebt.config import ConfigError
from ebt.thinking.loop import InferenceOptions

ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def checked(parse: Callable[[str], Any], check: Callable[[Any], bool], allowed: str) -> Any:
    """An argparse `type=`: `parse` the text, then `check` it; else "'TEXT': must be ALLOWED"."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = None
        finite = not isinstance(value, float) or math.isfinite(value)
        if value is None or not finite or not check(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {allowed}")
        return value

    return convert


def at_least(low: float, parse: Callable[[str], Any] = float, strict: bool = False) -> Any:
    """A `parse`d (int or float) value >= `low`, or > `low` when `strict`."""
    check = (lambda value: value > low) if strict else (lambda value: value >= low)
    kind = "an integer" if parse is int else "a number"
    return checked(parse, check, f"{kind} {'>' if strict else '>='} {low:g}")


def int_list(text: str) -> list[int]:
    """ "1,2,4" -> [1, 2, 4]: one or more integers >= 1 (ValueError otherwise)."""
    values = [int(item) for item in text.split(",")]  # "" and "1,,2" fail here
    if not all(value >= 1 for value in values):
        raise ValueError(text)
    return values


def unescape(text: str) -> str:
    """A --stop string with \\n, \\t and \\\\ read as a newline, a tab and a backslash."""
    return re.sub(r"\\([nt\\])", lambda found: ESCAPES[found[1]], text)


COUNT, INT_0 = at_least(1, int), at_least(0, int)
POSITIVE, NON_NEGATIVE = at_least(0, strict=True), at_least(0)
SEED = checked(int, lambda value: -(2**63) <= value < 2**63, "an integer in [-2**63, 2**63)")
STEPS_LIST = checked(int_list, bool, "a comma-separated list of integers >= 1, e.g. 1,2,4")
STOP = checked(unescape, bool, "a non-empty string")
TOP_P = checked(float, lambda value: 0 < value <= 1, "a number in (0, 1]")


def print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, indent=None, sort_keys=True))


def thinking_options(args: argparse.Namespace) -> InferenceOptions:
    """The inference thinking options of `think` / `generate`, checked against --halt-tolerance
    (where the command has that flag)."""
    options = InferenceOptions(args.step_size, args.langevin_noise, args.accept_lower_energies)
    try:
        options.check_halting(getattr(args, "halt_tolerance", None))
    except ValueError:
        raise ConfigError(
            "--halt-tolerance does not combine with --accept-lower-energies"
        ) from None
    return options


def add_thinking_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--step-size",
        type=POSITIVE,
        default=None,
        help="EBT step size: 0 < a < 1 scales the trained alpha, a >= 1 replaces it",
    )
    parser.add_argument(
        "--langevin-noise",
        type=NON_NEGATIVE,
        default=None,
        help="Langevin noise sigma at inference (default: the trained one; 0: none)",
    )
    parser.add_argument(
        "--accept-lower-energies",
        action="store_true",
        help="keep a thinking step only where it lowers the energy (one extra forward)",
    )


def add_run_parser(
    sub: Any, name: str, handler: Callable, help_text: str
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("run", help="run directory (or one of its step_* checkpoints)")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    parser.set_defaults(handler=handler)
    return parser


def add_selection_options(parser: argparse.ArgumentParser) -> None:
    """Best-of-N selection rule of `think` / `probe` (see ebt.thinking.selection.Selection)."""
    from ebt.thinking.selection import SELECTION_RULES

    parser.add_argument(
        "--selection",
        choices=SELECTION_RULES,
        default=None,
        help="best of N: lowest final energy per token (the paper's), weighted (probabilities "
        "averaged with weights softmax(-E/T)), sequence (one candidate per sequence); default: "
        "the run's think.selection",
    )
    parser.add_argument(
        "--selection-temperature",
        type=at_least(0, strict=True),
        default=None,
        help="T of --selection weighted, in energy units (large: the plain average); default: "
        "the run's think.selection_temperature",
    )


def selection_options(args: Any, think: Any) -> Any:
    """The Selection (ebt.thinking.selection) of the --selection flags (anything with
    `selection` and `selection_temperature`: the parsed flags, a request), else the run's."""
    from ebt.thinking.selection import Selection

    rule = args.selection or think.selection
    temperature = args.selection_temperature or think.selection_temperature
    return Selection(rule, temperature)
