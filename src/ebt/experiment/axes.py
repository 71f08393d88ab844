"""Scaling axes: what one value of `--axis` changes in a config, and the x it is plotted at.

Every axis turns one value into `section.key=value` overrides of the study's base config:

- data: training tokens (text) or examples (images, video); train.max_steps = value / (batch x
  tokens per example), with warm-up, evaluation and saving following it; x = the tokens trained.
- steps: optimiser steps (train.max_steps, as data); x = the value.
- batch: examples per step (train.batch_size); x = the value.
- depth: blocks (model.layers); x = the value.
- width: model.dim, heads keeping the base config's head width; x = the value.
- params: DIMxLAYERS, e.g. 128x4 (model.dim, model.layers, heads as for width); x = the
  non-embedding parameters counted from the built model.

Data is counted as the paper counts it (tokens seen in training, each once at this scale);
params are counted from the built model, embeddings excluded, as the paper's x axis.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ebt.config import Config, ConfigError
from ebt.modalities import unit_for

AXES = ("data", "batch", "depth", "width", "params", "steps")
_PARAMS = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class Point:
    """One run of a study: the axis value as given, its overrides and its model."""

    axis: str
    value: str
    model: str  # "ebt" or "baseline"
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.model}-{self.axis}-{self.value}"


def parse_values(axis: str, text: str) -> list[str]:
    """The comma-separated `--values` of an axis, checked: positive integers (params:
    DIMxLAYERS), at least two, no repeats."""
    if axis not in AXES:
        raise ConfigError(f"--axis {axis!r}: must be one of {', '.join(AXES)}")
    values = [value.strip() for value in text.split(",") if value.strip()]
    for value in values:
        ok = _PARAMS.match(value) if axis == "params" else value.isdigit() and int(value) > 0
        if not ok:
            shape = "DIMxLAYERS (e.g. 128x4)" if axis == "params" else "a positive integer"
            raise ConfigError(f"--values {value!r} for --axis {axis}: each must be {shape}")
    if len(values) < 2 or len(set(values)) != len(values):
        raise ConfigError(f"--values {text!r}: a power law needs at least two distinct values")
    return values


def _steps_overrides(config: Config, steps: int) -> list[str]:
    """max_steps and what follows it: warm-up at most a fifth of the run, one evaluation at the
    end (and each quarter), checkpoints each quarter so an interrupted point resumes."""
    quarter = max(1, steps // 4)
    warmup = min(config.train.warmup_steps, steps // 5)
    return [
        f"train.max_steps={steps}",
        f"train.warmup_steps={warmup}",
        f"train.eval_every={quarter}",
        f"train.save_every={quarter}",
    ]


def _heads_for(config: Config, dim: int) -> int:
    """Heads for width `dim` at the base config's head width (at least one, dividing dim)."""
    head_width = config.model.dim // config.model.heads
    heads = max(1, dim // head_width)
    while dim % heads:
        heads -= 1
    return heads


def axis_overrides(config: Config, axis: str, value: str) -> list[str]:
    """The overrides that put `config` at `value` of `axis`."""
    if axis == "data":
        per_step = config.train.batch_size * unit_for(config).units_per_example(config)
        steps = max(1, round(int(value) / per_step))
        return _steps_overrides(config, steps)
    if axis == "steps":
        return _steps_overrides(config, int(value))
    if axis == "batch":
        return [f"train.batch_size={value}"]
    if axis == "depth":
        return [f"model.layers={value}"]
    if axis == "width":
        return [f"model.dim={value}", f"model.heads={_heads_for(config, int(value))}"]
    match = _PARAMS.match(value)
    assert match is not None  # parse_values checked it
    dim, layers = int(match[1]), int(match[2])
    return [f"model.dim={dim}", f"model.layers={layers}", f"model.heads={_heads_for(config, dim)}"]


def copy_config(config: Config) -> Config:
    """A deep copy (overrides mutate configs in place)."""
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model),
        think=dataclasses.replace(config.think),
        data=dataclasses.replace(config.data),
        train=dataclasses.replace(config.train),
    )
