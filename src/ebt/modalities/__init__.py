"""Modalities: what text, images (and later video) add to the one core.

A modality is a small unit: its data (datasets and batch iterators), its candidate space and
loss (a task the shared `Objective` drives: split a batch into context and targets, the initial
state, the per-step loss, evaluation weights and metrics) and any assets a run directory keeps
(the tokenizer). The thinking loop, the objective, the trainer, checkpoints, resume, torchrun
and the CLI verbs are shared; `config.model.modality` picks the unit.
"""

from __future__ import annotations

from typing import Any

from ebt.config import Config
from ebt.modalities.image.task import ImageModality, ImageTask
from ebt.modalities.text.task import TextModality, TextTask
from ebt.modalities.video.task import VideoModality

MODALITIES = {"text": TextModality, "image": ImageModality, "video": VideoModality}

__all__ = [
    "ImageModality",
    "ImageTask",
    "TextModality",
    "TextTask",
    "modality_for",
]


def modality_for(config: Config, tokenizer: Any = None) -> TextModality | ImageModality:
    """The modality unit `config.model.modality` names (text reuses `tokenizer` if given)."""
    return MODALITIES[config.model.modality](config, tokenizer)
