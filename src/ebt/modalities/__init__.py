"""Modalities: what text, images and video add to the one core.

A modality is a small unit: its data (datasets and batch iterators), its candidate space and
loss (a task the shared `Objective` drives: split a batch into context and targets, the initial
state, the per-step loss, evaluation weights and metrics) and any assets a run directory keeps
(the tokenizer). The thinking loop, the objective, the trainer, checkpoints, resume, torchrun
and the CLI verbs are shared; `config.model.modality` picks the unit. Whatever else differs by
modality (example batches, baselines, metrics, units per example, the commands for its runs)
the unit's class answers (unit.py), so no module outside modalities/ asks which one it holds.
"""

from __future__ import annotations

from typing import Any

from ebt.config import Config
from ebt.modalities.image.task import ImageModality, ImageTask
from ebt.modalities.text.task import TextModality, TextTask
from ebt.modalities.unit import ModalityUnit
from ebt.modalities.video.task import VideoModality

MODALITIES: dict[str, type[ModalityUnit]] = {
    "text": TextModality,
    "image": ImageModality,
    "video": VideoModality,
}

__all__ = [
    "ImageModality",
    "ImageTask",
    "ModalityUnit",
    "TextModality",
    "TextTask",
    "VideoModality",
    "modality_for",
    "unit_for",
]


def unit_for(config: Config) -> type[ModalityUnit]:
    """The class of the modality `config.model.modality` names: its class-level answers
    (ModalityUnit) without loading any data or tokenizer."""
    return MODALITIES[config.model.modality]


def modality_for(config: Config, tokenizer: Any = None) -> ModalityUnit:
    """The modality unit `config.model.modality` names (text reuses `tokenizer` if given)."""
    return unit_for(config)(config, tokenizer)
