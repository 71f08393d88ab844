"""Loading trained runs: `ebt.load(path)` for a model, `load_run(path)` for everything, the one
run loader of every command (`load_run(path, modality="image")` refuses other runs in one line).

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
from ebt.data import Tokenizer
from ebt.errors import WrongModalityError
from ebt.modalities import MODALITIES, unit_for
from ebt.modalities.unit import article
from ebt.models import build_model


@dataclass
class LoadedRun:
    model: nn.Module
    tokenizer: Tokenizer | None  # None for images
    config: Config
    checkpoint: Path


def _fixed_keys(config: Config) -> dict[str, Any]:
    """The keys a checkpoint's weights fix: every model.* key and data.tokenizer, and those the
    modality adds (video: the frame size, the clip length, the numbers per frame)."""
    keys = {f"model.{key}": value for key, value in dataclasses.asdict(config.model).items()}
    keys["data.tokenizer"] = config.data.tokenizer
    return keys | unit_for(config).fixed_data_keys(config)


def _refuse_other_modality(path: str | Path, config: Config, modality: str, verb: str) -> None:
    """WrongModalityError (one line) unless the run is of `modality`: which modality it is,
    what needs which, and the commands for the run it is."""
    if modality not in MODALITIES:
        raise ValueError(f"modality={modality!r}: one of {', '.join(MODALITIES)}")
    found = unit_for(config)
    if found.name == modality:
        return
    wanted = f"{article(modality)} {modality} run"
    raise WrongModalityError(
        f"{path} is {article(found.name)} {found.name} run; {verb or 'this'} needs {wanted} "
        f"({found.name} runs: {found.commands})"
    )


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
    path: str | Path,
    overrides: list[str] | None = None,
    device: str | torch.device = "cpu",
    *,
    modality: str | None = None,
    verb: str = "",
) -> LoadedRun:
    """Model (eval mode), tokenizer and config of a run directory or one of its step_* dirs.

    Overrides (`section.key=value`) change the config before the model is built, e.g. the
    thinking recipe used by evaluation; weights always come from the checkpoint, so overrides
    of model.* or data.tokenizer that differ from it are refused. A run whose newest checkpoint
    is unreadable loads the newest one that reads (see `load_newest_valid`).

    modality ("text", "image" or "video"): refuse a run of any other (WrongModalityError, one
    line naming `verb`, e.g. "ebt denoise", and the commands for the run's own modality) before
    any model or tokenizer is built.
    """
    loaded = load_newest_valid(path, device=device)
    saved = config_from_dict(loaded.config)
    if modality is not None:
        _refuse_other_modality(path, saved, modality, verb)
    config = finalize(apply_overrides(config_from_dict(loaded.config), overrides or []))
    _refuse_model_changes(saved, config)
    tokenizer = unit_for(config).run_tokenizer(loaded.step_dir, config)
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
