"""Loading trained runs: `ebt.load(path)` for a model, `load_run(path)` for everything."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ebt.checkpoint import load_model_state, resolve_checkpoint
from ebt.config import Config, apply_overrides, config_from_dict, finalize
from ebt.data import Tokenizer, load_tokenizer
from ebt.models import build_model


@dataclass
class LoadedRun:
    model: nn.Module
    tokenizer: Tokenizer
    config: Config
    checkpoint: Path


def _tokenizer_for(step_dir: Path, config: Config) -> Tokenizer:
    for candidate in (step_dir.parent / "tokenizer", step_dir / "tokenizer"):
        if candidate.is_dir():
            return load_tokenizer(str(candidate))
    return load_tokenizer(config.data.tokenizer)


def load_run(
    path: str | Path, overrides: list[str] | None = None, device: str | torch.device = "cpu"
) -> LoadedRun:
    """Model (eval mode), tokenizer and config of a run directory or one of its step_* dirs.

    Overrides (`section.key=value`) change the config before the model is built, e.g. the
    thinking recipe used by evaluation; weights always come from the checkpoint.
    """
    step_dir = resolve_checkpoint(path)
    state, config_dict = load_model_state(step_dir, device=str(device))
    config = config_from_dict(config_dict)
    config = finalize(apply_overrides(config, overrides or []))
    tokenizer = _tokenizer_for(step_dir, config)
    model = build_model(config, tokenizer.vocab_size)
    model.load_state_dict(state)
    if any(item.strip().startswith("think.langevin_noise") for item in overrides or []):
        with torch.no_grad():  # an explicit noise level replaces the trained sigma
            model.langevin_std.fill_(config.think.langevin_noise)
    model.to(device).eval()
    return LoadedRun(model, tokenizer, config, step_dir)


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model of a run directory (or a step_* checkpoint directory), in eval mode."""
    return load_run(path, device=device).model
