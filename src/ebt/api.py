"""Loading trained runs: `ebt.load(path)` for a model, `load_run(path)` for everything.

Both read a run through `checkpoint.load_newest_valid`, which the trainer's resume uses too: the
checkpoint `latest` names, or else the newest older one that loads (saying on stderr which it
skipped and why). Loading never writes into the run directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ebt.checkpoint import load_newest_valid
from ebt.config import Config, ConfigError, apply_overrides, config_from_dict, finalize
from ebt.data import Tokenizer, load_tokenizer
from ebt.models import build_model, frame_dim


@dataclass
class LoadedRun:
    model: nn.Module
    tokenizer: Tokenizer | None  # None for images
    config: Config
    checkpoint: Path


def _tokenizer_for(step_dir: Path, config: Config) -> Tokenizer:
    for candidate in (step_dir.parent / "tokenizer", step_dir / "tokenizer"):
        if candidate.is_dir():
            return load_tokenizer(str(candidate))
    return load_tokenizer(config.data.tokenizer)


def _fixed_keys(config: Config) -> dict[str, Any]:
    """The keys a checkpoint's weights fix: every model.* key and data.tokenizer; for video
    also the frame size (the frame embedding's width) and the clip length (the position table)."""
    keys = {f"model.{key}": value for key, value in dataclasses.asdict(config.model).items()}
    keys["data.tokenizer"] = config.data.tokenizer
    if config.model.modality == "video":
        keys |= {"data.frame_size": config.data.frame_size, "data.frames": config.data.frames}
        keys |= {"model.frame_dim": frame_dim(config)}  # the encoder's (pixels / VAE latents)
    return keys


def _refuse_model_changes(saved: Config, config: Config) -> None:
    """ConfigError (one line) if overrides changed a model key or data.tokenizer.

    The weights fix the model's shape and vocabulary; a changed key would fail deep inside
    `load_state_dict` (or silently compute something else, e.g. rope_theta).
    """
    fixed, now = _fixed_keys(saved), _fixed_keys(config)
    changed = [
        f"{key}={now[key]} does not match the checkpoint ({fixed[key]})"
        for key in fixed
        if now[key] != fixed[key]
    ]
    if changed:
        raise ConfigError(
            f"{'; '.join(changed)}: a trained run's model keys and data.tokenizer cannot be "
            "overridden (its weights fix them); drop those overrides (think.*, train.* and other "
            "data.* keys may change)"
        )


def load_run(
    path: str | Path, overrides: list[str] | None = None, device: str | torch.device = "cpu"
) -> LoadedRun:
    """Model (eval mode), tokenizer and config of a run directory or one of its step_* dirs.

    Overrides (`section.key=value`) change the config before the model is built, e.g. the
    thinking recipe used by evaluation; weights always come from the checkpoint, so overrides
    of model.* or data.tokenizer that differ from it are refused. A run whose newest checkpoint
    is unreadable loads the newest one that reads (see `load_newest_valid`).
    """
    loaded = load_newest_valid(path, device=device)
    saved = config_from_dict(loaded.config)
    config = finalize(apply_overrides(config_from_dict(loaded.config), overrides or []))
    _refuse_model_changes(saved, config)
    text = config.model.modality == "text"
    tokenizer = _tokenizer_for(loaded.step_dir, config) if text else None
    model = build_model(config, tokenizer.vocab_size if tokenizer else 0)
    model.load_state_dict(loaded.model_state)
    noise = any(item.strip().startswith("think.langevin_noise") for item in overrides or [])
    if noise and hasattr(model, "langevin_std"):
        with torch.no_grad():  # an explicit noise level replaces the trained sigma
            model.langevin_std.fill_(config.think.langevin_noise)
    model.to(device).eval()
    return LoadedRun(model, tokenizer, config, loaded.step_dir)


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model of a run directory (or a step_* checkpoint directory), in eval mode."""
    return load_run(path, device=device).model
