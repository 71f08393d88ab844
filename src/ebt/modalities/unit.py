"""What every modality unit answers, with the defaults images and video share.

The questions code outside `modalities/` would otherwise ask of `config.model.modality`: which
commands serve its runs, which baseline it is measured against, what a random training batch
looks like, how many predicted units (tokens, images, frames) one example holds, which metric a
study fits by default, which data keys a checkpoint's weights fix and which assets (the text
tokenizer) a run directory keeps. All are class-level: a run loader asks them before any data or
tokenizer loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ebt.config import BASELINES, Config


class ModalityUnit:
    """The class-level answers of a modality (see the module docstring)."""

    name: ClassVar[str]
    commands: ClassVar[str]  # the commands for its runs beyond train/eval/bench, e.g. "ebt denoise"
    default_metric: ClassVar[str]  # what `ebt experiment scaling` fits by default
    metrics: ClassVar[tuple[str, ...]]  # the scalar keys every final evaluation row has
    generates_tokens: ClassVar[bool] = False  # whether `ebt bench generate` applies

    @classmethod
    def baseline_kind(cls) -> str:
        """model.kind of the same-size baseline (config.BASELINES)."""
        return BASELINES[cls.name]

    @classmethod
    def units_per_example(cls, config: Config) -> int:
        """Units a data axis counts per example: 1 (images and video count examples)."""
        return 1

    @classmethod
    def example_batch(cls, config: Config, vocab_size: int, device: torch.device) -> torch.Tensor:
        """A random training batch of this modality (see the subclasses)."""
        raise NotImplementedError

    @classmethod
    def shape_keys(cls, config: Config) -> dict[str, Any]:
        """The data keys that shape a training step (reported by `ebt bench`)."""
        return {}

    @classmethod
    def fixed_data_keys(cls, config: Config) -> dict[str, Any]:
        """The data.* keys (and derived model keys) a checkpoint's weights fix, beyond model.*
        and data.tokenizer."""
        return {}

    @classmethod
    def run_tokenizer(cls, step_dir: Path, config: Config) -> Any:
        """The tokenizer a trained run reads with (None: this modality has none)."""
        return None


def article(word: str) -> str:
    """ "a" or "an" before `word` ("an image run", "a video run")."""
    return "an" if word[:1].lower() in "aeiou" else "a"
