"""Builders: the network a Config describes, one builder per modality in a registry keyed by
the modality's name (`BUILDERS`), so `build_model` asks no question of the config and models/
never imports modalities/ (which is higher: the modality units call into models/, not back).

Text and video share the autoregressive energy transformer and the Transformer++ (text: token
ids in, logits out; video: one token per frame, frame vectors of `frame_dim` numbers in and
out); images have the bidirectional image EBT and the DiT.

`inference_steps` (the default of `model.think(steps=None)`) is the steps per landscape for
every energy model, and `think(steps=k)` runs `landscapes` x k steps (`args.landscapes`, the
config's think.landscapes). The image EBT has no landscape conditioning, so its landscapes are
only repeats of the steps (image runs imported from the paper have one step on each of its
mcmc_num_steps landscapes).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ebt.config import Config
from ebt.config_checks import CHANNELS, frame_dim
from ebt.models.dit import DiT, DiTArgs
from ebt.models.energy_transformer import EnergyTransformer, EnergyTransformerArgs
from ebt.models.image_energy import ImageEnergyArgs, ImageEnergyTransformer
from ebt.models.patch_frames import PatchFrameEnergyTransformer, PatchFrameTransformerPP
from ebt.models.transformer_pp import TransformerArgs, TransformerPP


def steps_per_landscape(config: Config) -> int:
    """Steps per landscape of the trained recipe: think.steps, or with random steps their
    minimum (think.random_steps_min, at least 1)."""
    think = config.think
    return (think.random_steps_min or 1) if think.random_steps else think.steps


def build_model(config: Config, vocab_size: int = 0) -> nn.Module:
    """The model a config describes (`model.modality` picks the builder, `model.kind` the
    network; vocab_size is the text models'; video's frame vectors come from data.frame_size,
    its length from data.frames)."""
    return BUILDERS[config.model.modality](config, vocab_size)


def build_token_model(config: Config, vocab_size: int) -> nn.Module:
    """Text: token ids (B, S) in, a logit vector per position out."""
    return _build_sequence_model(config, vocab_size, config.data.seq_len, frame_size=0)


def build_frame_model(config: Config, vocab_size: int = 0) -> nn.Module:
    """Video: frame vectors (B, T - 1, frame_dim) in, a next-frame vector per position out."""
    return _build_sequence_model(config, vocab_size, config.data.frames - 1, frame_dim(config))


def _build_sequence_model(
    config: Config, vocab_size: int, length: int, frame_size: int
) -> nn.Module:
    """The autoregressive EBT or its Transformer++ twin over `length` positions (frame_size
    numbers per frame vector; 0 for tokens)."""
    model = config.model
    ffn_dim = model.ffn_dim or model.dim
    patches = bool(frame_size) and model.frame_tokens == "patches"
    tokens = (
        {"frame_size": config.data.frame_size, "patch_size": model.patch_size} if patches else {}
    )
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
            frame_size,
            **tokens,
        )
        if patches:
            args.frame_residual = model.frame_residual
            return PatchFrameTransformerPP(args)
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
        inference_steps=steps_per_landscape(config),  # per landscape
        frame_dim=frame_size,
        **tokens,
    )
    return PatchFrameEnergyTransformer(args) if patches else EnergyTransformer(args)


def build_image_model(config: Config, vocab_size: int = 0) -> nn.Module:
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
    return ImageEnergyTransformer(
        ImageEnergyArgs(
            **shape,
            step_size=think.step_size,
            step_size_learnable=think.step_size_learnable,
            langevin_noise=think.langevin_noise,
            landscapes=think.landscapes,
            inference_steps=steps_per_landscape(config),  # per landscape
        )
    )


BUILDERS: dict[str, Callable[[Config, int], nn.Module]] = {
    "text": build_token_model,
    "image": build_image_model,
    "video": build_frame_model,
}
