"""The paper's video EBT checkpoints (its autoregressive EBT on frame latents) in our layout.

The paper's video model is its text trunk (`transformer.*`, the same names as the text EBT) fed
by a frame down-projection `encoder_down_projection` (Linear(frame_dim, D) with bias) that
embeds real frames and candidate frames alike; ours is the same EnergyTransformer with
`frame_embedding` in that place. The frozen frame encoder (a VAE) is not in the checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ebt.config import Config, ThinkConfig, config_from_dict
from ebt.interop.imported import (
    check_loads,
    keeps_ffn_width,
    model_order,
    write_imported_run,
)
from ebt.interop.reference import (
    InteropError,
    hparams_from_config,
    our_key,
    reference_key,
    think_from_hparams,
    train_from_hparams,
)
from ebt.models import frame_dim
from ebt.models.energy_transformer import EnergyTransformer, EnergyTransformerArgs

_FRAME_RULES = {  # the paper's name (without `model.`) -> ours; the trunk maps as for text
    "encoder_down_projection.weight": "frame_embedding.weight",
    "encoder_down_projection.bias": "frame_embedding.bias",
    "encoder_up_projection.weight": "frame_output.weight",  # its video Transformer++
    "encoder_up_projection.bias": "frame_output.bias",
}
_INVERSE_FRAME_RULES = {ours: theirs for theirs, ours in _FRAME_RULES.items()}
FROZEN_ENCODER = "image_encoder."  # the paper's frozen VAE / DINOv2 submodule
_VARIANTS = ("time_embed", "adaln", "default")


def video_our_key(reference_key: str) -> str:
    """Our parameter name for one of the paper's video-EBT parameters."""
    name = reference_key.removeprefix("model.").replace("_orig_mod.", "")
    return _FRAME_RULES.get(name) or our_key(name)


def video_reference_key(key: str, variant: str) -> str:
    """The paper's name (without `model.`) for one of our video-model parameters."""
    return _INVERSE_FRAME_RULES.get(key) or reference_key(key, variant)


def video_reference_state_dict(
    state: dict[str, torch.Tensor], variant: str, prefix: str = "model."
) -> dict[str, torch.Tensor]:
    """Our video state_dict renamed to the paper's, keys under `prefix` (tensors shared)."""
    return {prefix + video_reference_key(key, variant): value for key, value in state.items()}


_OTHER_MODALITY_KEYS = (  # text (token tables) and image (patch embedder, DiT) weights
    "embeddings.",
    "vocab_to_embed.",
    "transformer.x_embedder.",
    "diffusion_transformer.",
)


def is_video_reference(hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint of the paper's code holds one of its video models. The weights
    decide: text or image weights go to their importer (which names a wrong `modality` flag),
    a frame down-projection (or the frozen frame encoder) is video; without either,
    modality='VID' is."""
    names = [key.removeprefix("model.").replace("_orig_mod.", "") for key in state]
    if any(name.startswith(("encoder_down_projection.", FROZEN_ENCODER)) for name in names):
        return True
    if any(name.startswith(_OTHER_MODALITY_KEYS) for name in names):
        return False
    return hparams.get("modality") == "VID"


def without_frozen_encoder(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's video state_dict less its frozen frame encoder (`image_encoder.*`, the whole
    SD VAE in a checkpoint its trainer wrote): ebt runs do not store it."""
    return {
        key: value
        for key, value in reference.items()
        if not key.removeprefix("model.").replace("_orig_mod.", "").startswith(FROZEN_ENCODER)
    }


def convert_video_state_dict(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's video-EBT state_dict renamed to ours (tensors shared; its frozen frame
    encoder left out)."""
    return {video_our_key(key): value for key, value in without_frozen_encoder(reference).items()}


def video_think_config(hparams: dict[str, Any]) -> ThinkConfig:
    """The thinking recipe (S1 / S2 knobs) a paper video checkpoint was trained with."""
    return ThinkConfig(
        landscapes=int(hparams["mcmc_num_steps"]),
        steps=1,
        step_size=float(hparams["mcmc_step_size"]),
        step_size_learnable=bool(hparams.get("mcmc_step_size_learnable", False)),
        step_size_random_scale=float(hparams.get("randomize_mcmc_step_size_scale", 1.0)),
        random_steps=int(hparams.get("randomize_mcmc_num_steps", 0)),
        random_steps_min=int(hparams.get("randomize_mcmc_num_steps_min", 0)),
        langevin_noise=float(hparams.get("langevin_dynamics_noise", 0.0)),
        truncate=bool(hparams.get("truncate_mcmc", False)),
        detach=not hparams.get("no_mcmc_detach", False),
        init="zeros" if hparams.get("denoising_initial_condition") == "zeros" else "random_noise",
        init_scale=float(hparams.get("gaussian_random_noise_scaling", 1.0)),
    )


def video_model_from_reference(
    reference: dict[str, torch.Tensor], hparams: dict[str, Any]
) -> EnergyTransformer:
    """Our video EBT built from the paper's hyper-parameters, its weights loaded (strict)."""
    state = convert_video_state_dict(reference)
    variant = str(hparams.get("ebt_type", "default"))
    if variant not in _VARIANTS or "frame_embedding.weight" not in state:
        raise ValueError(f"not a paper video EBT with a frame down-projection ({variant})")
    dim = int(hparams["embedding_dim"])
    think = video_think_config(hparams)
    args = EnergyTransformerArgs(
        vocab_size=0,
        dim=dim,
        layers=int(hparams["num_transformer_blocks"]),
        heads=int(hparams["multiheaded_attention_heads"]),
        ffn_dim=int(state["blocks.0.feed_forward.w1.weight"].shape[0]),
        max_seq_len=int(hparams["context_length"]),
        variant=variant,
        landscapes=think.landscapes,
        step_size=think.step_size,
        step_size_learnable=think.step_size_learnable,
        langevin_noise=think.langevin_noise,
        frame_dim=int(state["frame_embedding.weight"].shape[1]),
    )
    model = EnergyTransformer(args)
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------- configs

_MODEL_NAMES = {"ebt": "ebt", "baseline_transformer": "transformer_pp"}
_INITS = {"random_noise": "random_noise", "zeros": "zeros", "most_recent_embedding": "last_frame"}
_EXPORT_INITS = {ours: theirs for theirs, ours in _INITS.items()}
SD_SCALING = 0.18215  # the paper's sdxl_vae_standardization constant
PAPER_FRAME_DIM = 3136  # the paper's code hardcodes Linear(3136, D): SD-VAE latents of 224 x 224
PAPER_VAE = "stabilityai/sd-vae-ft-mse"  # its load_image_encoder (use_ema: sd-vae-ft-ema)
# (flag, the only value ebt implements, what another value would do); EBT flags only
_VIDEO_FIXED = (
    ("energy_loss_coeff", 0.0, "an energy regression loss term"),
    ("out_of_bounds_loss_coeff", 0.0, "an out-of-bounds loss term"),
    ("reconstruction_coeff", 1.0, "a scaled loss"),
    ("langevin_dynamics_noise_learnable", False, "a learnable Langevin sigma"),
    ("weight_tie_vae_proj", False, "tied down / up projections"),
)


def video_kind(hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """ "ebt" or "transformer_pp" from the weights, checked against model_name when present."""
    found = "transformer_pp" if "frame_output.weight" in state else "ebt"
    name = hparams.get("model_name")
    if name is not None and _MODEL_NAMES.get(name) != found:
        raise InteropError(f"model_name={name!r} but the weights are those of its video {found}")
    if "frame_embedding.weight" not in state:
        raise InteropError(
            "the paper's video model has no encoder_down_projection (a DINOv2 backbone, or "
            "embedding_dim = 3136); ebt imports its VAE-latent models with a down-projection"
        )
    return found


def check_video_supported(hparams: dict[str, Any], kind: str) -> None:
    """Raise InteropError naming the first flag ebt cannot represent."""
    backbone = hparams.get("backbone_type", "vae")
    if backbone != "vae":
        raise InteropError(f"the paper's flag backbone_type={backbone!r}: ebt imports 'vae' only")
    fixed = _VIDEO_FIXED if kind == "ebt" else _VIDEO_FIXED[-1:]
    for key, value, what in fixed:
        if key in hparams and hparams[key] != value:
            raise InteropError(
                f"the paper's flag {key}={hparams[key]!r} is not supported by ebt ({what}; "
                f"ebt implements {key}={value!r} only)"
            )
    init = hparams.get("denoising_initial_condition", "random_noise")
    if kind == "ebt" and init not in _INITS:
        choices = ", ".join(_INITS)
        raise InteropError(f"denoising_initial_condition={init!r}: ebt imports {choices}")
    if kind == "ebt" and hparams.get("ebt_type", "default") not in (*_VARIANTS, "adaln_zero"):
        raise InteropError(f"the paper's flag ebt_type={hparams['ebt_type']!r} is not supported")


def _frame_size(hparams: dict[str, Any], frame_dim: int) -> int:
    """The frame side: image_dims when stored, else the SD VAE's (4 x (F/8)^2 latents)."""
    if hparams.get("image_dims"):
        return int(hparams["image_dims"][0])
    side = round(math.sqrt(frame_dim / 4))
    return 8 * side if 4 * side * side == frame_dim else 224


def _ffn_dim(state: dict[str, torch.Tensor], dim: int) -> int:
    """model.ffn_dim of the weights: 0 (= dim, ebt's default) for the paper's multiplier 1."""
    width = int(state["blocks.0.feed_forward.w1.weight"].shape[0])
    return 0 if width == dim else width


def video_config_from_hparams(hparams: dict[str, Any], raw: dict[str, torch.Tensor]) -> Config:
    """Our Config for a video checkpoint of the paper's code (its EBT or Transformer++).

    Frames: the SD VAE (the paper's `stabilityai/sd-vae-ft-mse`, or -ema with use_ema) on
    offline clips (`data.source = "pan"`), clips of context_length frames (the paper's video
    loaders read context_length frames a clip, so context_length - 1 next-frame predictions).
    """
    state = convert_video_state_dict(raw)
    kind = video_kind(hparams, state)
    check_video_supported(hparams, kind)
    frame_dim = int(state["frame_embedding.weight"].shape[1])
    think = think_from_hparams(hparams)
    think["init"] = _INITS.get(str(think["init"]), "random_noise")
    variant = str(hparams.get("ebt_type", "default")) if kind == "ebt" else "time_embed"
    values = {
        "model": {
            "modality": "video",
            "kind": kind,
            "variant": "adaln" if variant == "adaln_zero" else variant,
            "dim": int(hparams["embedding_dim"]),
            "layers": int(hparams["num_transformer_blocks"]),
            "heads": int(hparams["multiheaded_attention_heads"]),
            "ffn_dim": _ffn_dim(state, int(hparams["embedding_dim"])),
        },
        "data": {
            "source": "pan",
            "frames": int(hparams["context_length"]),
            "frame_size": _frame_size(hparams, frame_dim),
            "frame_encoder": "vae",
            "frame_dim": frame_dim,
            "vae": "stabilityai/sd-vae-ft-ema" if hparams.get("use_ema") else PAPER_VAE,
            "vae_scaling": SD_SCALING if hparams.get("sdxl_vae_standardization") else 1.0,
        },
        "think": think,
        "train": train_from_hparams(hparams),
    }
    return config_from_dict(values)


def video_hparams_from_config(config: Config) -> dict[str, Any]:
    """The paper's hyper_parameters for one of our video configs; refuses what its video code
    cannot load (pixel frames, latents other than its 3136, another latent scaling)."""
    data = config.data
    problems = []
    if data.frame_encoder != "vae" or frame_dim(config) != PAPER_FRAME_DIM:
        problems.append(
            f"frames of {frame_dim(config)} numbers ({data.frame_encoder}); the paper's video "
            f"code reads SD-VAE latents of {PAPER_FRAME_DIM} (data.frame_encoder=vae, 224 x 224)"
        )
    if data.vae_scaling not in (1.0, SD_SCALING):
        problems.append(f"data.vae_scaling={data.vae_scaling} (the paper's: 1 or {SD_SCALING})")
    if config.model.dim == PAPER_FRAME_DIM:
        problems.append(f"model.dim={PAPER_FRAME_DIM} (the paper's code then has no projection)")
    if problems:
        raise InteropError("cannot export to the paper's video format: " + "; ".join(problems))
    values = hparams_from_config(config) | {
        "modality": "VID",
        "context_length": data.frames,
        "backbone_type": "vae",
        "vit_backbone_size": "base",
        "vae_normalization": True,
        "sdxl_vae_standardization": data.vae_scaling == SD_SCALING,
        "use_ema": data.vae.rstrip("/").endswith("sd-vae-ft-ema"),
        "image_dims": [data.frame_size, data.frame_size],
        "energy_loss_fn": "smooth_l1_loss",
        "weight_tie_vae_proj": False,
    }
    if config.model.kind == "ebt":
        values |= {"energy_loss_coeff": 0.0, "out_of_bounds_loss_coeff": 0.0}
        values["denoising_initial_condition"] = _EXPORT_INITS[config.think.init]
    return values


# --------------------------------------------------------------------------- run directories


def import_video_reference(loaded: dict[str, Any], checkpoint: str | Path, out: Path) -> Path:
    """Write an ebt run from a read video checkpoint of the paper's code; returns its step dir.
    The frozen frame encoder is not in the checkpoint: the run names the paper's VAE."""
    raw, hparams = loaded["state_dict"], loaded["hyper_parameters"]
    try:
        config = video_config_from_hparams(hparams, raw)
        state = convert_video_state_dict(raw)
    except KeyError as error:
        what = "(not a video EBT or Transformer++ of the paper)"
        raise InteropError(f"{error.args[0]} {what}") from None
    check_loads(config, state, 0)
    return write_imported_run(out, config, state, loaded, checkpoint)


def video_reference_checkpoint(
    config: Config, state: dict[str, torch.Tensor], original: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(hyper_parameters, state_dict) of a video run in the paper's layout; flags ebt does not
    model keep an imported run's values."""
    derived = video_hparams_from_config(config)
    hparams = original | derived
    if keeps_ffn_width(original, derived):  # keep the run's own spelling (e.g. 1 for None)
        hparams["ffn_dim_multiplier"] = original["ffn_dim_multiplier"]
    state = model_order(config, state, 0)
    return hparams, video_reference_state_dict(state, config.model.variant)
