"""Models: the energy transformers and their baselines (Transformer++, DiT), built from a Config
(builders.py).

Text and video share one autoregressive energy transformer and one Transformer++ (video: one
token per frame, frame vectors in and out); images have the bidirectional EBT and the DiT.
"""

from __future__ import annotations

import shutil
import warnings

import torch
from torch import nn

from ebt.models.builders import BUILDERS, CHANNELS, build_image_model, build_model, frame_dim
from ebt.models.context_cache import ContextCache
from ebt.models.dit import DiT
from ebt.models.energy_transformer import EnergyTransformer
from ebt.models.image_energy import ImageEnergyTransformer
from ebt.models.transformer_pp import TransformerPP

__all__ = [
    "BUILDERS",
    "CHANNELS",
    "ContextCache",
    "DiT",
    "EnergyTransformer",
    "ImageEnergyTransformer",
    "TransformerPP",
    "build_image_model",
    "build_model",
    "compile_for_training",
    "prepare_inductor",
    "frame_dim",
]


def compile_for_training(model: nn.Module, device: torch.device) -> None:
    """train.compile: torch.compile the passes of a training step (see the models'
    compile_training_passes). Compilation happens on the first step (about a minute on CPU)."""
    prepare_inductor(device)
    model.compile_training_passes()


def prepare_inductor(device: torch.device) -> None:
    """Refuse (ValueError) a CPU without a C++ compiler, which inductor needs there; quiet the
    warning about complex numbers (RoPE), which inductor leaves to eager kernels."""
    compilers = ("c++", "g++", "clang++")
    if device.type == "cpu" and not any(shutil.which(name) for name in compilers):
        raise ValueError(
            "train.compile=true needs a C++ compiler on CPU (torch.compile's inductor writes "
            "C++ kernels): install g++ or clang++, or set train.compile=false"
        )
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation")
