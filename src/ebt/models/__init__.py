"""Models: the energy transformer and its Transformer++ baseline, built from a Config."""

from __future__ import annotations

import shutil
import warnings

import torch
from torch import nn

from ebt.config import Config
from ebt.models.dit import DiT, DiTArgs
from ebt.models.energy_transformer import ContextCache, EnergyTransformer, EnergyTransformerArgs
from ebt.models.image_energy import ImageEnergyArgs, ImageEnergyTransformer
from ebt.models.transformer_pp import TransformerArgs, TransformerPP

CHANNELS = 3  # images are RGB

__all__ = [
    "ContextCache",
    "DiT",
    "EnergyTransformer",
    "ImageEnergyTransformer",
    "TransformerPP",
    "build_model",
    "compile_for_training",
]


def build_model(config: Config, vocab_size: int = 0) -> nn.Module:
    """The model a config describes (`model.modality` and `model.kind` pick it; vocab_size is
    the text models')."""
    if config.model.modality == "image":
        return build_image_model(config)
    model = config.model
    ffn_dim = model.ffn_dim or model.dim
    if model.kind == "transformer_pp":
        args = TransformerArgs(
            vocab_size,
            model.dim,
            model.layers,
            model.heads,
            ffn_dim,
            config.data.seq_len,
            model.norm_eps,
            model.rope_theta,
        )
        return TransformerPP(args)
    think = config.think
    args = EnergyTransformerArgs(
        vocab_size=vocab_size,
        dim=model.dim,
        layers=model.layers,
        heads=model.heads,
        ffn_dim=ffn_dim,
        max_seq_len=config.data.seq_len,
        variant=model.variant,
        landscapes=think.landscapes,
        norm_eps=model.norm_eps,
        rope_theta=model.rope_theta,
        step_size=think.step_size,
        step_size_learnable=think.step_size_learnable,
        langevin_noise=think.langevin_noise,
        inference_steps=(think.random_steps_min or 1) if think.random_steps else think.steps,
    )
    return EnergyTransformer(args)


def build_image_model(config: Config) -> nn.Module:
    """The image EBT or its DiT twin (same width, depth and patch size)."""
    model, think = config.model, config.think
    shape = {
        "image_size": config.data.image_size,
        "channels": CHANNELS,
        "patch_size": model.patch_size,
        "dim": model.dim,
        "layers": model.layers,
        "heads": model.heads,
        "ffn_dim": model.ffn_dim or None,
    }
    if model.kind == "dit":
        return DiT(DiTArgs(**shape))
    steps = (think.random_steps_min or 1) if think.random_steps else think.steps
    return ImageEnergyTransformer(
        ImageEnergyArgs(
            **shape,
            step_size=think.step_size,
            step_size_learnable=think.step_size_learnable,
            langevin_noise=think.langevin_noise,
            inference_steps=steps * think.landscapes,
        )
    )


def compile_for_training(model: nn.Module, device: torch.device) -> None:
    """train.compile: torch.compile the passes of a training step (see the models'
    compile_training_passes). Compilation happens on the first step (about a minute on CPU)."""
    compilers = ("c++", "g++", "clang++")
    if device.type == "cpu" and not any(shutil.which(name) for name in compilers):
        raise ValueError(
            "train.compile=true needs a C++ compiler on CPU (torch.compile's inductor writes "
            "C++ kernels): install g++ or clang++, or set train.compile=false"
        )
    # RoPE multiplies complex numbers; inductor leaves those few ops to eager kernels
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation")
    model.compile_training_passes()
