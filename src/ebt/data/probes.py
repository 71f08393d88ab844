"""Reasoning probes generated offline: Dyck languages and elementary arithmetic.

A probe is a set of problems, each a prompt and its one right answer, written as one line of
text (a document):

- ``dyck``: a prefix of a balanced bracket sequence of up to four kinds, ``=``, then the closing
  sequence that balances it (BigBench's dyck_languages, compactly): ``([]{<>=})`` + newline.
- ``arithmetic``: ``12+7=`` then the result: ``19`` + newline.

The newline ends every answer, so a model that has answered also says it is done. A source
string names the probe and its parameters, ``dyck:max_depth=4,kinds=3`` (see DYCK_PARAMETERS,
ARITHMETIC_PARAMETERS), plus the bare word ``ood`` for its out-of-distribution version: Dyck
sequences longer (total length in (max_length, ood_length]) and deeper (a peak depth in
(max_depth, ood_depth]) than any trained on; arithmetic operands with more digits (one operand
has digits+1 .. ood_digits digits). Problems are drawn from `random.Random` seeded with the
parameters, so a source string gives the same problems everywhere; train and val are split by
a stable hash of each problem's text (a problem and its duplicates land in the same split).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

from ebt.data.splits import in_split
from ebt.errors import DataError

PROBES_VERSION = 1  # bump when the generators change (cached token datasets are keyed by it)
BRACKETS = ("()", "[]", "{}", "<>")
SEPARATOR, END = "=", "\n"
OPERATIONS = "+-*"
MAX_TRIES = 1000  # OOD Dyck draws per problem before giving up on reaching the depth


@dataclass(frozen=True)
class Problem:
    """One probe question: the prompt (ending in '=') and the answer (ending in a newline)."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


@dataclass(frozen=True)
class DyckSpec:
    """Dyck problems: `kinds` bracket kinds; total length (prefix + closing) in
    [min_length, max_length], even; nesting depth at most `max_depth`."""

    kinds: int = 3
    min_length: int = 4
    max_length: int = 20
    max_depth: int = 4
    ood_length: int = 40  # OOD: total length in (max_length, ood_length]
    ood_depth: int = 8  # OOD: peak depth in (max_depth, ood_depth]
    count: int = 20000  # problems drawn (before the train / val split)
    seed: int = 0
    ood: bool = False
    name = "dyck"


@dataclass(frozen=True)
class ArithmeticSpec:
    """Arithmetic problems `a OP b=`: operands of min_digits..digits digits, OP from `ops`;
    subtraction keeps a >= b (no negative results)."""

    digits: int = 2
    min_digits: int = 1
    ops: str = "+-"
    ood_digits: int = 4  # OOD: one operand has digits+1 .. ood_digits digits
    count: int = 50000
    seed: int = 0
    ood: bool = False
    name = "arithmetic"


Spec = DyckSpec | ArithmeticSpec
SPECS: dict[str, type] = {"dyck": DyckSpec, "arithmetic": ArithmeticSpec}


def is_probe_source(source: str) -> bool:
    """Whether `source` names a probe (`dyck`, `arithmetic`, optionally `:parameters`)."""
    return source.strip().split(":", 1)[0] in SPECS


def parameter_names(name: str) -> list[str]:
    return [item.name for item in fields(SPECS[name])]


def parse_source(source: str) -> Spec:
    """The spec of a probe source string, e.g. `dyck:kinds=2,max_depth=6,ood`; every problem is
    a one-line DataError naming the parameter and what it must be."""
    name, _, text = source.strip().partition(":")
    if name not in SPECS:
        raise DataError(f"unknown probe '{name}': use one of {', '.join(SPECS)}")
    values: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        key, equals, value = item.partition("=")
        key = key.strip()
        if key not in parameter_names(name):
            valid = ", ".join(parameter_names(name))
            raise DataError(
                f"data source '{source}': unknown {name} parameter '{key}'; use {valid}"
            )
        values[key] = _parse_value(source, key, value.strip() if equals else "true")
    spec = SPECS[name](**values)
    check_spec(spec, source)
    return spec


def _parse_value(source: str, key: str, text: str) -> Any:
    if key == "ood":
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise DataError(f"data source '{source}': ood={text!r}: must be true or false")
    if key == "ops":
        return text
    try:
        return int(text)
    except ValueError:
        raise DataError(f"data source '{source}': {key}={text!r}: must be an integer") from None


def _spec_problems(spec: Spec) -> list[str]:
    """Why a spec cannot generate (empty if it can)."""
    problems = [f"count={spec.count}: must be >= 1"] if spec.count < 1 else []
    if isinstance(spec, DyckSpec):
        rules = [
            (1 <= spec.kinds <= len(BRACKETS), f"kinds={spec.kinds}: must be in 1..4"),
            (spec.max_depth >= 1, f"max_depth={spec.max_depth}: must be >= 1"),
            (spec.min_length >= 2, f"min_length={spec.min_length}: must be >= 2"),
            (
                spec.max_length >= spec.min_length + spec.min_length % 2,
                f"max_length={spec.max_length}: must allow an even length >= min_length",
            ),
            (
                spec.ood_length >= spec.max_length + 2,
                f"ood_length={spec.ood_length}: must be >= max_length + 2",
            ),
            (
                spec.ood_depth > spec.max_depth,
                f"ood_depth={spec.ood_depth}: must be > max_depth={spec.max_depth}",
            ),
        ]
    else:
        rules = [
            (spec.min_digits >= 1, f"min_digits={spec.min_digits}: must be >= 1"),
            (spec.digits >= spec.min_digits, f"digits={spec.digits}: must be >= min_digits"),
            (spec.ood_digits > spec.digits, f"ood_digits={spec.ood_digits}: must be > digits"),
            (
                bool(spec.ops) and set(spec.ops) <= set(OPERATIONS),
                f"ops={spec.ops!r}: must be one or more of {OPERATIONS}",
            ),
        ]
    return problems + [message for ok, message in rules if not ok]


def check_spec(spec: Spec, source: str) -> None:
    problems = _spec_problems(spec)
    if problems:
        raise DataError(f"data source '{source}': {'; '.join(problems)}")


def source_problems(source: str, key: str) -> list[str]:
    """For config checks: `key=source: why` for a probe source that does not parse."""
    if not is_probe_source(source):
        return []
    try:
        parse_source(source)
    except DataError as error:
        return [f"{key}: {error}"]
    return []


def ood_version(spec: Spec) -> Spec:
    """The out-of-distribution version of a spec (the same parameters, `ood` set)."""
    return replace(spec, ood=True)


def source_string(spec: Spec) -> str:
    """The canonical source string of a spec (every parameter that differs from the default)."""
    default = type(spec)()
    parts = [
        f"{item.name}={getattr(spec, item.name)}"
        for item in fields(spec)
        if item.name != "ood" and getattr(spec, item.name) != getattr(default, item.name)
    ]
    parts += ["ood"] if spec.ood else []
    return spec.name + (":" + ",".join(parts) if parts else "")


def _rng(spec: Spec) -> random.Random:
    """A generator seeded by the spec's name, seed and split (in / out of distribution)."""
    return random.Random(f"{spec.name}|{spec.seed}|{'ood' if spec.ood else 'in'}")


def _dyck_walk(rng: random.Random, spec: DyckSpec, length: int, depth_cap: int) -> Problem:
    """A random prefix of `length - d` brackets ending at depth d (d drawn in 1..), staying
    within [0, depth_cap], and its closing sequence of d brackets."""
    final = rng.randint(1, min(depth_cap, length // 2))
    prefix, stack = [], []
    for remaining in range(length - final, 0, -1):
        height = len(stack)
        can_open = height + 1 <= depth_cap and abs(height + 1 - final) <= remaining - 1
        can_close = height >= 1 and abs(height - 1 - final) <= remaining - 1
        if can_open and (not can_close or rng.random() < 0.5):
            pair = BRACKETS[rng.randrange(spec.kinds)]
            stack.append(pair[1])
            prefix.append(pair[0])
        else:
            prefix.append(stack.pop())
    return Problem("".join(prefix) + SEPARATOR, "".join(reversed(stack)) + END)


def peak_depth(text: str) -> int:
    """The deepest nesting of the brackets in `text`."""
    depth = peak = 0
    for char in text:
        if any(char == pair[0] for pair in BRACKETS):
            depth += 1
            peak = max(peak, depth)
        elif any(char == pair[1] for pair in BRACKETS):
            depth -= 1
    return peak


def _dyck_problem(rng: random.Random, spec: DyckSpec) -> Problem:
    if not spec.ood:
        low = spec.min_length + spec.min_length % 2
        length = rng.randrange(low, spec.max_length + 1, 2)
        return _dyck_walk(rng, spec, length, spec.max_depth)
    length = rng.randrange(spec.max_length + 2, spec.ood_length + 1, 2)
    problem = _dyck_walk(rng, spec, length, spec.ood_depth)
    for _ in range(MAX_TRIES):  # deeper than training too, where the length allows it
        if peak_depth(problem.prompt) > spec.max_depth:
            break
        problem = _dyck_walk(rng, spec, length, spec.ood_depth)
    return problem


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _arithmetic_problem(rng: random.Random, spec: ArithmeticSpec) -> Problem:
    sizes = [rng.randint(spec.min_digits, spec.digits) for _ in range(2)]
    if spec.ood:  # one operand (either) gets more digits than any trained on
        sizes[rng.randrange(2)] = rng.randint(spec.digits + 1, spec.ood_digits)
    first, second = (_operand(rng, size) for size in sizes)
    operation = spec.ops[rng.randrange(len(spec.ops))]
    if operation == "-" and first < second:
        first, second = second, first
    result = {"+": first + second, "-": first - second, "*": first * second}[operation]
    return Problem(f"{first}{operation}{second}{SEPARATOR}", f"{result}{END}")


def generate(spec: Spec) -> Iterator[Problem]:
    """The spec's `count` problems, the same for the same spec everywhere."""
    rng = _rng(spec)
    make: Callable[[random.Random, Any], Problem]
    make = _dyck_problem if isinstance(spec, DyckSpec) else _arithmetic_problem
    for _ in range(spec.count):
        yield make(rng, spec)


def problems(spec: Spec, split: str, val_fraction: float) -> list[Problem]:
    """The problems of `split` ("train", "val" or "all"), by the hash of each problem's text."""
    return [p for p in generate(spec) if in_split(p.text, split, val_fraction)]


def documents_function(source: str) -> Callable[[str, float], Iterator[str]]:
    """For corpus sources: (split, val_fraction) -> the problems' texts as documents."""
    spec = parse_source(source)
    return lambda split, val_fraction: (p.text for p in problems(spec, split, val_fraction))


def fingerprint(source: str) -> str:
    """What a cached token dataset of this source depends on."""
    return f"{source_string(parse_source(source))}|probes-v{PROBES_VERSION}"
