"""The paper's image checkpoints (its denoising EBT and DiT): hyper-parameters <-> our config.

The paper's image models read a handful of flags (`model/img/ebt_denoise.py`,
`model/img/dit_denoise.py`): the shape (`image_dims`, `patch_size`, `embedding_dim`, ...), the
noise (`denoise_images_noise_level`, `diffusion_steps`) and, for the EBT, the thinking recipe
(`mcmc_*`, `truncate_mcmc`, `no_mcmc_detach`, ...). These become `model.modality = "image"`,
`model.kind` ebt | dit and the matching `model.*`, `data.*`, `think.*` and `train.*` keys; flags
that would make the paper's model compute something ebt does not are refused by name. The
weights are renamed by ebt.interop.image_reference.
"""

from __future__ import annotations

from typing import Any

import torch

from ebt.config import Config, config_from_dict
from ebt.interop.image_reference import is_dit_state
from ebt.interop.reference import (
    INFERENCE_DEFAULTS,
    TRAIN_FLAGS,
    InteropError,
    ffn_multiplier,
    think_from_hparams,
    train_from_hparams,
)

_IMAGE_MODELS = ("ebt", "dit")
_REQUIRED = (
    "image_dims",
    "patch_size",
    "embedding_dim",
    "num_transformer_blocks",
    "multiheaded_attention_heads",
)
_TRUNK_KEYS = ("transformer.x_embedder.", "diffusion_transformer.")

# The paper's argparse defaults (train_model.py) for the flags read here, where a checkpoint
# lacks one (Lightning writes every flag, so only hand-made checkpoints do).
PAPER_DEFAULTS: dict[str, Any] = {
    "mcmc_num_steps": 2,
    "mcmc_step_size": 60.0,
    "mcmc_step_size_learnable": False,
    "mcmc_step_size_lr_multiplier": 5000.0,
    "diffusion_steps": 1000,
    "denoise_images_noise_level": 1.0,
    "ffn_dim_multiplier": None,
}

# Flags the paper's image code reads that ebt does not model: written on export unless the run
# was imported with its own value (they change logging, data or nothing ebt computes).
EXPORT_DEFAULTS: dict[str, Any] = {
    "dataset_name": "coco_medium",
    "custom_image_normalization": False,
    "log_image_every_n_steps": 1000,
    "use_deterministic_reverse": True,
    "execution_mode": "pretrain",
}
_EBT_EXPORT_DEFAULTS: dict[str, Any] = {
    "ebt_type": "time_embed",  # passed by the paper's scripts, unused by the image EBT
    "denoising_initial_condition": "random_noise",  # unused: thinking starts from the noisy image
    "no_langevin_during_eval": False,  # ebt's evaluation keeps the trained Langevin noise
    "langevin_dynamics_noise_learnable": False,
    "mcmc_replay_buffer_size": 192,
    "mcmc_replay_buffer_sample_bs_percent": 0.5,
}

# (flag, the only value ebt implements, what another value would do); EBT flags only.
_EBT_FIXED: tuple[tuple[str, Any, str], ...] = (
    ("randomize_denoise_images_noise_level", False, "training noise at random timesteps"),
    ("reconstruction_coeff", 1.0, "a scaled loss"),
)


def is_image_reference(hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint of the paper's code holds one of its image models."""
    if hparams.get("modality") == "IMG":
        return True
    names = (key.removeprefix("model.").replace("_orig_mod.", "") for key in state)
    return any(name.startswith(_TRUNK_KEYS) for name in names)


def image_kind(hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """The kind, "ebt" or "dit", the weights are; checked against model_name when present."""
    found = "dit" if is_dit_state(state) else "ebt"
    named = hparams.get("model_name", found)
    if named not in _IMAGE_MODELS:
        raise InteropError(
            f"the paper's flag model_name={named!r} is not supported by ebt for images "
            f"(one of {', '.join(_IMAGE_MODELS)})"
        )
    if named != found:
        raise InteropError(f"model_name={named!r} but the weights are those of its {found}")
    return found


def check_image_supported(hparams: dict[str, Any], kind: str) -> None:
    """Raise InteropError naming the first flag ebt cannot represent."""
    modality = hparams.get("modality", "IMG")
    if modality != "IMG":
        raise InteropError(
            f"the paper's flag modality={modality!r} is not supported by ebt with image weights "
            "(its image models have modality='IMG')"
        )
    task = hparams.get("image_task", "denoising")
    if task != "denoising":
        raise InteropError(
            f"the paper's flag image_task={task!r} is not supported by ebt "
            "(its pixel-space denoising models only, image_task='denoising')"
        )
    missing = [key for key in _REQUIRED if key not in hparams]
    if missing:
        raise InteropError(f"the checkpoint's hyper_parameters lack {', '.join(missing)}")
    dims = list(hparams["image_dims"])
    if len(dims) != 2 or dims[0] != dims[1]:
        raise InteropError(
            f"the paper's flag image_dims={dims!r} is not supported by ebt (square images only)"
        )
    if kind != "ebt":
        return
    for key, value, what in _EBT_FIXED:
        if key in hparams and hparams[key] != value:
            raise InteropError(
                f"the paper's flag {key}={hparams[key]!r} is not supported by ebt "
                f"({what}; ebt implements {key}={value!r} only)"
            )


def _ffn_dim(hparams: dict[str, Any]) -> int:
    """model.ffn_dim: 0 (= dim) for a multiplier of 1, else int(dim * multiplier)."""
    dim, multiplier = int(hparams["embedding_dim"]), hparams["ffn_dim_multiplier"]
    width = dim if multiplier is None else int(dim * float(multiplier))
    return 0 if width == dim else width


def image_config_from_hparams(hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> Config:
    """Our Config for an image checkpoint of the paper's code; refuses what ebt cannot represent.

    Data: the offline photographs (`skimage`) at the checkpoint's image size; the paper's COCO
    is `data.source=hf:AbdoTW/COCO_2014`. The out-of-distribution level is twice the training
    one (the paper's 0.1 -> 0.2), at most 1.
    """
    kind = image_kind(hparams, state)
    check_image_supported(hparams, kind)
    hparams = PAPER_DEFAULTS | hparams
    level = float(hparams["denoise_images_noise_level"])
    values: dict[str, Any] = {
        "model": {
            "modality": "image",
            "kind": kind,
            "dim": hparams["embedding_dim"],
            "layers": hparams["num_transformer_blocks"],
            "heads": hparams["multiheaded_attention_heads"],
            "ffn_dim": _ffn_dim(hparams),
            "patch_size": hparams["patch_size"],
        },
        "data": {
            "source": "skimage",
            "image_size": int(hparams["image_dims"][0]),
            "noise_level": level,
            "ood_noise_level": min(1.0, 2 * level),
            "diffusion_steps": hparams["diffusion_steps"],
        },
        "train": train_from_hparams(hparams),
    }
    if kind == "ebt":
        values["think"] = _image_think(hparams)
    return config_from_dict(values)


def _image_think(hparams: dict[str, Any]) -> dict[str, Any]:
    """think.*: the paper's mcmc_num_steps are landscapes of one step each (the image EBT has no
    step conditioning, so only the randomised step counts tell them apart, as in its code)."""
    think = think_from_hparams(hparams)
    for unused in ("absolute_clamp", "init", "init_scale"):  # the image EBT reads none of them
        think.pop(unused)
    return think | {"steps": 1}


def _refuse_image_export(config: Config) -> None:
    think, problems = config.think, []
    if config.model.kind == "ebt":
        if think.replay_buffer:
            problems.append("think.replay_buffer=true (the paper's image EBT raises on it)")
        if think.absolute_clamp:
            problems.append("think.absolute_clamp (the paper's image EBT has no state clamp)")
        if think.steps > 1 and think.random_steps:
            problems.append(
                "think.steps > 1 with think.random_steps (the paper randomises the repeats of "
                "each of its mcmc_num_steps; use think.landscapes with think.steps=1)"
            )
    if problems:
        raise InteropError("cannot export to the paper's format: " + "; ".join(problems))


def image_export_defaults(kind: str) -> dict[str, Any]:
    """Flags of the paper's image code that ebt does not model, at the values an export writes
    unless the run was imported with its own (logging, data, inference-time settings)."""
    return EXPORT_DEFAULTS | ((_EBT_EXPORT_DEFAULTS | INFERENCE_DEFAULTS) if kind == "ebt" else {})


def image_hparams_from_config(config: Config) -> dict[str, Any]:
    """The paper's hyper_parameters (its flag names) for what one of our image configs models."""
    _refuse_image_export(config)
    model, data, train = config.model, config.data, config.train
    multiplier = ffn_multiplier(model.dim, model.ffn_dim)
    values: dict[str, Any] = {
        "modality": "IMG",
        "model_name": model.kind,
        "image_task": "denoising",
        "image_dims": [data.image_size, data.image_size],
        "patch_size": model.patch_size,
        "embedding_dim": model.dim,
        "num_transformer_blocks": model.layers,
        "multiheaded_attention_heads": model.heads,
        "ffn_dim_multiplier": 1.0 if multiplier is None else multiplier,
        "denoise_images_noise_level": data.noise_level,
        "diffusion_steps": data.diffusion_steps,
        "peak_learning_rate": train.lr,
        "min_lr_scale": round(1.0 / train.min_lr_ratio) if train.min_lr_ratio > 0 else 10,
        "max_scheduling_steps": train.schedule_steps or train.max_steps,
        "float_precision": "bf16-mixed" if train.precision == "bf16" else "32-true",
    }
    values |= {theirs: getattr(train, ours) for theirs, ours in TRAIN_FLAGS}
    return values | (_image_ebt_hparams(config) if model.kind == "ebt" else {})


def _image_ebt_hparams(config: Config) -> dict[str, Any]:
    think = config.think
    fixed = not think.random_steps
    return {
        "mcmc_num_steps": think.landscapes * (think.steps if fixed else 1),
        "mcmc_step_size": think.step_size,
        "mcmc_step_size_learnable": think.step_size_learnable,
        "mcmc_step_size_lr_multiplier": think.step_size_lr_multiplier,
        "randomize_mcmc_step_size_scale": think.step_size_random_scale,
        "randomize_mcmc_num_steps": think.random_steps,
        "randomize_mcmc_num_steps_min": think.random_steps_min,
        "randomize_mcmc_num_steps_final_landscape": think.random_steps_final_landscape,
        "langevin_dynamics_noise": think.langevin_noise,
        "mcmc_replay_buffer": False,
        "truncate_mcmc": think.truncate,
        "no_mcmc_detach": not think.detach,
        "clamp_futures_grad": think.grad_clamp > 0,
        "clamp_futures_grad_max_change": think.grad_clamp or 9.0,
        "randomize_denoise_images_noise_level": False,
        "reconstruction_coeff": 1.0,
    }


def same_ffn_width(original: dict[str, Any], derived: dict[str, Any]) -> bool:
    """Whether an imported run's own ffn_dim_multiplier spells the exported width (e.g. 1)."""
    if original.get("ffn_dim_multiplier") is None:
        return False
    dim = derived["embedding_dim"]
    widths = (int(dim * float(h["ffn_dim_multiplier"])) for h in (original, derived))
    return len(set(widths)) == 1
