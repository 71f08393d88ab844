"""The paper's code (alexiglad/EBT) checkpoint layout: parameter names and hyper-parameters.

Its Lightning checkpoints hold `state_dict` (keys under `model.`) and `hyper_parameters` (a plain
dict of its argparse flags). These functions translate both into ours and back, refusing what the
other side cannot represent instead of silently computing something else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ebt.config import Config, config_from_dict
from ebt.errors import InteropError

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

# (our name pattern, paper name); energy_head.weight depends on the variant (see reference_key).
_INVERSE_RULES: list[tuple[str, str]] = [
    (r"step_size", "alpha"),
    (r"langevin_std", "langevin_dynamics_noise_std"),
    (r"token_embedding\.weight", "embeddings.weight"),
    (r"candidate_projection\.weight", "vocab_to_embed.weight"),
    (r"output\.weight", "output.weight"),
    (
        r"blocks\.(\d+)\.modulation\.1\.(weight|bias)",
        r"transformer.layers.\1.adaLN_modulation.1.\2",
    ),
    (r"blocks\.(\d+)\.(.+)", r"transformer.layers.\1.\2"),
    (r"norm\.weight", "transformer.norm.weight"),
    (r"step_embedding\.weight", "transformer.time_embeddings.weight"),
    (r"final_modulation\.1\.(weight|bias)", r"transformer.final_layer.adaLN_modulation.1.\1"),
]


@dataclass(frozen=True)
class _Fixed:
    """A flag of the paper's code whose value ebt implements in exactly one way."""

    key: str
    value: Any  # the value ebt implements (what export writes)
    what: str  # what other values would do, for the refusal message
    applies: Callable[[dict[str, Any]], bool] = lambda hparams: True


def _time_embed(hparams: dict[str, Any]) -> bool:
    return hparams.get("ebt_type", "default") == "time_embed"  # only EBTTimeConcat reads them


# Every EBT flag that changes what a trained text model computes (or its training objective) and
# that ebt implements one way only. Initialisation, optimiser, data and logging flags are not
# listed: they do not change what imported weights compute.
FIXED_FLAGS: tuple[_Fixed, ...] = (
    _Fixed("normalize_initial_condition", True, "ebt always softmaxes candidates"),
    _Fixed("normalize_initial_condition_only_first_step", False, "softmax on step 1 only"),
    _Fixed("vocab_to_embed_uses_prob_dist", False, "candidates embedded by the token table"),
    _Fixed("num_modality_processing_mlp_layers", 1, "an MLP candidate projection"),
    _Fixed("learnable_process_memory", False, "a learnable process memory"),
    _Fixed("ebt_norm", "rms", "another normalisation layer", _time_embed),
    _Fixed("ebt_act_func", "silu", "another FFN activation", _time_embed),
    _Fixed("sharpen_predicted_distribution", 0.0, "dividing candidates after each step"),
    _Fixed("soften_target_prob_dist", 0.0, "per-step label smoothing in the loss"),
    _Fixed("contrastive_loss", False, "a contrastive energy loss term"),
    _Fixed("reconstruction_coeff", 1.0, "a scaled loss"),
    _Fixed("langevin_dynamics_noise_learnable", False, "a learnable Langevin sigma"),
    _Fixed(
        "clamp_max_after_warm_up",
        0.0,
        "a gradient clamp that changes after warm-up",
        lambda hparams: bool(hparams.get("clamp_futures_grad")),
    ),
)
_MODEL_NAMES = {"ebt": "ebt", "baseline_transformer": "transformer_pp"}
_REQUIRED = (
    "embedding_dim",
    "num_transformer_blocks",
    "multiheaded_attention_heads",
    "context_length",
)
_INITS = ("random_noise", "zeros")


def _normalised(name: str) -> str:
    """A paper parameter name without the Lightning `model.` and torch.compile prefixes."""
    return name.removeprefix("model.").replace("_orig_mod.", "")


def our_key(reference_key: str) -> str:
    """Our parameter name for one of the paper's (with or without the `model.` prefix)."""
    name = _normalised(reference_key)
    for pattern, replacement in _KEY_RULES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise KeyError(f"no mapping for the paper's parameter '{reference_key}'")


def reference_key(key: str, variant: str) -> str:
    """The paper's parameter name (without `model.`) for one of ours."""
    if key == "energy_head.weight":
        linear = ".linear" if variant == "adaln" else ""
        return f"transformer.final_layer{linear}.weight"
    for pattern, replacement in _INVERSE_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise KeyError(f"ebt parameter '{key}' has no counterpart in the paper's code")


def convert_state_dict(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's state_dict renamed to ours (tensors are shared, not copied)."""
    return {our_key(key): value for key, value in reference.items()}


def reference_state_dict(
    state: dict[str, torch.Tensor], variant: str, prefix: str = "model."
) -> dict[str, torch.Tensor]:
    """Our state_dict renamed to the paper's, keys under `prefix` (tensors are shared)."""
    return {prefix + reference_key(key, variant): value for key, value in state.items()}


def _check_model(hparams: dict[str, Any]) -> None:
    modality = hparams.get("modality", "NLP")
    if modality != "NLP":
        raise InteropError(
            f"the paper's flag modality={modality!r} is not supported by ebt "
            "(only the paper's text models, modality='NLP', and its denoising image models, "
            "modality='IMG', can be imported)"
        )
    name = hparams.get("model_name", "ebt")
    if name not in _MODEL_NAMES:
        raise InteropError(
            f"the paper's flag model_name={name!r} is not supported by ebt "
            f"(text models only: {', '.join(_MODEL_NAMES)})"
        )


def check_supported(hparams: dict[str, Any], kind: str = "ebt") -> None:
    """Raise InteropError naming the first flag ebt cannot represent.

    The EBT flags (FIXED_FLAGS, the initial candidate) are checked only for kind "ebt": the
    paper's Transformer++ ignores them.
    """
    _check_model(hparams)
    if kind != "ebt":
        return
    for flag in FIXED_FLAGS:
        if flag.key in hparams and hparams[flag.key] != flag.value and flag.applies(hparams):
            raise InteropError(
                f"the paper's flag {flag.key}={hparams[flag.key]!r} is not supported by ebt "
                f"({flag.what}; ebt implements {flag.key}={flag.value!r} only)"
            )
    init = hparams.get("denoising_initial_condition", "random_noise")
    if init not in _INITS:
        raise InteropError(
            f"the paper's flag denoising_initial_condition={init!r} is not supported by ebt "
            f"(one of {', '.join(_INITS)})"
        )


def _kind(hparams: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> str:
    """Kind "ebt" or "transformer_pp": model_name when present, checked against the weights."""
    names = {_normalised(key) for key in state_dict}
    found = "ebt" if "vocab_to_embed.weight" in names else "transformer_pp"
    if found == "transformer_pp" and "output.weight" not in names:
        raise InteropError("state_dict holds neither vocab_to_embed nor output weights")
    named = _MODEL_NAMES.get(hparams.get("model_name", ""), found)
    if named != found:
        raise InteropError(
            f"model_name={hparams['model_name']!r} but the weights are those of a {found} model"
        )
    return found


def config_from_hparams(hparams: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Config:
    """Our Config for a checkpoint of the paper's code; refuses flags we cannot represent."""
    _check_model(hparams)
    kind = _kind(hparams, state_dict)
    check_supported(hparams, kind)
    missing = [key for key in _REQUIRED if key not in hparams]
    if missing:
        raise InteropError(f"the checkpoint's hyper_parameters lack {', '.join(missing)}")
    ffn = [v for k, v in state_dict.items() if k.endswith("layers.0.feed_forward.w1.weight")]
    if not ffn:
        raise InteropError("state_dict holds no transformer.layers.0.feed_forward.w1.weight")
    variant = hparams.get("ebt_type", "default") if kind == "ebt" else "default"
    values = {
        "model": {
            "kind": kind,
            "variant": "adaln" if variant == "adaln_zero" else variant,
            "dim": hparams["embedding_dim"],
            "layers": hparams["num_transformer_blocks"],
            "heads": hparams["multiheaded_attention_heads"],
            "ffn_dim": int(ffn[0].shape[0]),
        },
        "data": {"seq_len": hparams["context_length"]},
        "think": think_from_hparams(hparams),
        "train": train_from_hparams(hparams),
    }
    return config_from_dict(values)


def think_from_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """Our think.* values for the paper's mcmc_* (and related) flags."""
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
        "replay_buffer_size": get("mcmc_replay_buffer_size", 192),
        "replay_fraction": get("mcmc_replay_buffer_sample_bs_percent", 0.5),
        "truncate": get("truncate_mcmc", False),
        "detach": not get("no_mcmc_detach", False),
        "grad_clamp": get("clamp_futures_grad_max_change", 9.0)
        if get("clamp_futures_grad")
        else 0.0,
        "absolute_clamp": get("absolute_clamp", 0.0),
        "init": get("denoising_initial_condition", "random_noise"),
        "init_scale": get("gaussian_random_noise_scaling", 1.0),
    }


# (paper flag, our train.* key) copied as they are when present.
TRAIN_FLAGS = (
    ("batch_size_per_device", "batch_size"),
    ("accumulate_grad_batches", "grad_accum"),
    ("max_steps", "max_steps"),
    ("warm_up_steps", "warmup_steps"),
    ("weight_decay", "weight_decay"),
    ("beta1", "beta1"),
    ("beta2", "beta2"),
    ("gradient_clip_val", "grad_clip"),
)


def train_from_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """Our train.* values for the paper's optimiser and schedule flags."""
    train = {
        ours: hparams[theirs] for theirs, ours in TRAIN_FLAGS if hparams.get(theirs) is not None
    }
    train["lr"] = hparams.get("peak_learning_rate", hparams.get("lr", 1.2e-3))
    if hparams.get("min_lr_scale"):
        train["min_lr_ratio"] = 1.0 / hparams["min_lr_scale"]
    horizon = hparams.get("max_scheduling_steps", -1)
    if horizon and horizon > 0 and horizon != hparams.get("max_steps"):
        train["schedule_steps"] = horizon
    if "float_precision" in hparams:
        train["precision"] = "bf16" if "bf16" in str(hparams["float_precision"]) else "fp32"
    return train


def _refuse_export(config: Config) -> None:
    model, problems = config.model, []
    if model.kind == "ebt" and model.variant == "pred_step":
        problems.append("model.variant=pred_step (the paper's code has no pred_step variant)")
    if model.norm_eps != 1e-5:
        problems.append(f"model.norm_eps={model.norm_eps} (the paper's code uses 1e-5)")
    if model.rope_theta != 1e4:
        problems.append(f"model.rope_theta={model.rope_theta} (the paper's code uses 10000)")
    if problems:
        raise InteropError("cannot export to the paper's format: " + "; ".join(problems))


def ffn_multiplier(dim: int, ffn_dim: int) -> float | None:
    """The paper's ffn_dim_multiplier m with int(dim * m) == ffn_dim (None: width = dim)."""
    if ffn_dim in (0, dim):
        return None
    multiplier = ffn_dim / dim
    while int(dim * multiplier) < ffn_dim:  # float rounding: nudge up to the exact width
        multiplier = math.nextafter(multiplier, math.inf)
    return multiplier


def hparams_from_config(config: Config) -> dict[str, Any]:
    """The paper's hyper_parameters (its flag names) for one of our configs.

    Refuses what the paper's code does not have (pred_step, other norm eps / RoPE theta).
    """
    _refuse_export(config)
    model, train = config.model, config.train
    values: dict[str, Any] = {
        "modality": "NLP",
        "model_name": "ebt" if model.kind == "ebt" else "baseline_transformer",
        "context_length": config.data.seq_len,
        "embedding_dim": model.dim,
        "num_transformer_blocks": model.layers,
        "multiheaded_attention_heads": model.heads,
        "ffn_dim_multiplier": ffn_multiplier(model.dim, model.ffn_dim),
        "peak_learning_rate": train.lr,
        "min_lr_scale": round(1.0 / train.min_lr_ratio) if train.min_lr_ratio > 0 else 10,
        "max_scheduling_steps": train.schedule_steps or train.max_steps,
        "float_precision": "bf16-mixed" if train.precision == "bf16" else "32-true",
        "execution_mode": "pretrain",
        "debug_unused_parameters": False,
        "weight_initialization_method": "xavier",
        "weight_initialization_gain": 1.0,
    }
    values |= {theirs: getattr(train, ours) for theirs, ours in TRAIN_FLAGS}
    if model.kind == "ebt":
        values |= _ebt_hparams(config)
    return values


def _ebt_hparams(config: Config) -> dict[str, Any]:
    think = config.think
    values = {flag.key: flag.value for flag in FIXED_FLAGS}
    values |= {
        "ebt_type": config.model.variant,
        "dyt_alpha_init": 0.5,
        "mcmc_num_steps": think.landscapes,
        "mcmc_step_size": think.step_size,
        "mcmc_step_size_learnable": think.step_size_learnable,
        "mcmc_step_size_lr_multiplier": think.step_size_lr_multiplier,
        "randomize_mcmc_step_size_scale": think.step_size_random_scale,
        "randomize_mcmc_num_steps": think.random_steps,
        "randomize_mcmc_num_steps_min": think.random_steps_min,
        "randomize_mcmc_num_steps_final_landscape": think.random_steps_final_landscape,
        "langevin_dynamics_noise": think.langevin_noise,
        "mcmc_replay_buffer": think.replay_buffer,
        "mcmc_replay_buffer_size": think.replay_buffer_size,
        "mcmc_replay_buffer_sample_bs_percent": think.replay_fraction,
        "truncate_mcmc": think.truncate,
        "no_mcmc_detach": not think.detach,
        "clamp_futures_grad": think.grad_clamp > 0,
        "clamp_futures_grad_max_change": think.grad_clamp or 9.0,
        "absolute_clamp": think.absolute_clamp,
        "denoising_initial_condition": think.init,
        "gaussian_random_noise_scaling": think.init_scale,
        "contrastive_loss_coeff": 0.0005,
        "process_memory_type": None,
        "process_memory_linear_layer": False,
    }
    return values | INFERENCE_DEFAULTS


# The paper's inference flags at its argparse defaults (its test runs override them anyway).
INFERENCE_DEFAULTS: dict[str, Any] = {
    "infer_ebt_num_steps": 1,
    "infer_ebt_override_alpha": 0,
    "infer_langevin_dynamics_noise": 0,
    "infer_generated_samples": 1,
    "infer_langevin_first_step": False,
    "infer_accept_lower_energies": False,
    "infer_steps_final_landscape": False,
    "infer_alpha_final_landscape": False,
    "infer_debug_sample_distances": False,
    "infer_energy_sampling_technique": "min",
}
