"""The paper's code (alexiglad/EBT) checkpoint layout: parameter names and hyper-parameters.

Its Lightning checkpoints hold `state_dict` (keys under `model.`) and `hyper_parameters` (a plain
dict of its argparse flags). These functions translate both into ours, refusing what our model
cannot represent instead of silently computing something else.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ebt.config import Config, ConfigError, config_from_dict

# (paper name pattern, our name) in the order they are tried.
_KEY_RULES: list[tuple[str, str]] = [
    (r"alpha", "step_size"),
    (r"langevin_dynamics_noise_std", "langevin_std"),
    (r"embeddings\.weight", "token_embedding.weight"),
    (r"vocab_to_embed\.weight", "candidate_projection.weight"),
    (r"output\.weight", "output.weight"),
    (
        r"transformer\.layers\.(\d+)\.adaLN_modulation\.1\.(weight|bias)",
        r"blocks.\1.modulation.1.\2",
    ),
    (r"transformer\.layers\.(\d+)\.(.+)", r"blocks.\1.\2"),
    (r"transformer\.norm\.weight", "norm.weight"),
    (r"transformer\.time_embeddings\.weight", "step_embedding.weight"),
    (r"transformer\.final_layer\.weight", "energy_head.weight"),
    (r"transformer\.final_layer\.linear\.weight", "energy_head.weight"),
    (r"transformer\.final_layer\.adaLN_modulation\.1\.(weight|bias)", r"final_modulation.1.\1"),
]

# Flags whose non-default values change behaviour in a way our model does not implement.
_UNSUPPORTED: dict[str, Any] = {
    "normalize_initial_condition": True,
    "normalize_initial_condition_only_first_step": False,
    "vocab_to_embed_uses_prob_dist": False,
    "num_modality_processing_mlp_layers": 1,
    "ebt_norm": "rms",
    "ebt_act_func": "silu",
    "sharpen_predicted_distribution": 0.0,
    "contrastive_loss": False,
    "soften_target_prob_dist": 0.0,
    "langevin_dynamics_noise_learnable": False,
    "weight_initialization_method": "xavier",
}


def our_key(reference_key: str) -> str:
    """Our parameter name for one of the paper's (with or without the `model.` prefix)."""
    name = reference_key.removeprefix("model.")
    for pattern, replacement in _KEY_RULES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise KeyError(f"no mapping for the paper's parameter '{reference_key}'")


def convert_state_dict(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's state_dict renamed to ours (tensors are shared, not copied)."""
    return {our_key(key): value for key, value in reference.items()}


def config_from_hparams(hparams: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Config:
    """Our Config for a checkpoint of the paper's code; refuses flags we cannot represent."""
    for key, expected in _UNSUPPORTED.items():
        if key in hparams and hparams[key] != expected:
            raise ConfigError(f"the paper's flag {key}={hparams[key]!r} is not supported by ebt")
    first_ffn = next(v for k, v in state_dict.items() if k.endswith("feed_forward.w1.weight"))
    is_ebt = any(key.endswith("vocab_to_embed.weight") for key in state_dict)
    variant = hparams.get("ebt_type", "default")
    values = {
        "model": {
            "kind": "ebt" if is_ebt else "transformer_pp",
            "variant": "adaln" if variant == "adaln_zero" else variant,
            "dim": hparams["embedding_dim"],
            "layers": hparams["num_transformer_blocks"],
            "heads": hparams["multiheaded_attention_heads"],
            "ffn_dim": int(first_ffn.shape[0]),
        },
        "data": {"seq_len": hparams["context_length"]},
        "think": _think_from_hparams(hparams),
        "train": {"lr": hparams.get("peak_learning_rate", hparams.get("lr", 1.2e-3))},
    }
    return config_from_dict(values)


def _think_from_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    get = hparams.get
    return {
        "landscapes": get("mcmc_num_steps", 2),
        "step_size": get("mcmc_step_size", 500.0),
        "step_size_learnable": get("mcmc_step_size_learnable", True),
        "step_size_lr_multiplier": get("mcmc_step_size_lr_multiplier", 5000.0),
        "step_size_random_scale": get("randomize_mcmc_step_size_scale", 1.0),
        "random_steps": get("randomize_mcmc_num_steps", 0),
        "random_steps_min": get("randomize_mcmc_num_steps_min", 0),
        "random_steps_final_landscape": get("randomize_mcmc_num_steps_final_landscape", False),
        "langevin_noise": get("langevin_dynamics_noise", 0.0),
        "replay_buffer": get("mcmc_replay_buffer", False),
        "truncate": get("truncate_mcmc", False),
        "detach": not get("no_mcmc_detach", False),
        "grad_clamp": get("clamp_futures_grad_max_change", 9.0)
        if get("clamp_futures_grad")
        else 0.0,
        "absolute_clamp": get("absolute_clamp", 0.0),
        "init": get("denoising_initial_condition", "random_noise"),
        "init_scale": get("gaussian_random_noise_scaling", 1.0),
    }
