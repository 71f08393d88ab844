"""Models: the energy transformers and their baselines (Transformer++, DiT), built from a Config.

Text and video share one autoregressive energy transformer and one Transformer++ (video: one
token per frame, frame vectors in and out); images have the bidirectional EBT and the DiT.
"""

from __future__ import annotations

import shutil
import warnings

import torch
from torch import nn

from ebt.config import Config
from ebt.config_checks import CHANNELS, frame_dim
from ebt.models.dit import DiT, DiTArgs
from ebt.models.energy_transformer import ContextCache, EnergyTransformer, EnergyTransformerArgs
from ebt.models.image_energy import ImageEnergyArgs, ImageEnergyTransformer
from ebt.models.transformer_pp import TransformerArgs, TransformerPP

__all__ = [
    "CHANNELS",
    "ContextCache",
    "DiT",
    "EnergyTransformer",
    "ImageEnergyTransformer",
    "TransformerPP",
    "build_model",
    "compile_for_training",
    "frame_dim",
]


def build_model(config: Config, vocab_size: int = 0) -> nn.Module:
    """The model a config describes (`model.modality` and `model.kind` pick it; vocab_size is
    the text models'; video's frame vectors come from data.frame_size, its length from
    data.frames)."""
    if config.model.modality == "image":
        return build_image_model(config)
    model, video = config.model, config.model.modality == "video"
    ffn_dim = model.ffn_dim or model.dim
    length = config.data.frames - 1 if video else config.data.seq_len
    if model.kind == "transformer_pp":
        args = TransformerArgs(
            vocab_size,
            model.dim,
            model.layers,
            model.heads,
            ffn_dim,
            length,
            model.norm_eps,
            model.rope_theta,
            frame_dim(config),
        )
        return TransformerPP(args)
    think = config.think
    args = EnergyTransformerArgs(
        vocab_size=vocab_size,
        dim=model.dim,
        layers=model.layers,
        heads=model.heads,
        ffn_dim=ffn_dim,
        max_seq_len=length,
        variant=model.variant,
        landscapes=think.landscapes,
        norm_eps=model.norm_eps,
        rope_theta=model.rope_theta,
        step_size=think.step_size,
        step_size_learnable=think.step_size_learnable,
        langevin_noise=think.langevin_noise,
        inference_steps=(think.random_steps_min or 1) if think.random_steps else think.steps,
        frame_dim=frame_dim(config),
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
