"""The paper's video EBT checkpoints (its autoregressive EBT on frame latents) in our layout.

The paper's video model is its text trunk (`transformer.*`, the same names as the text EBT) fed
by a frame down-projection `encoder_down_projection` (Linear(frame_dim, D) with bias) that
embeds real frames and candidate frames alike; ours is the same EnergyTransformer with
`frame_embedding` in that place. The frozen frame encoder (a VAE) is not in the checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

from ebt.config import ThinkConfig
from ebt.interop.reference import our_key
from ebt.models.energy_transformer import EnergyTransformer, EnergyTransformerArgs

_FRAME_RULES = {  # the paper's name (without `model.`) -> ours; the trunk maps as for text
    "encoder_down_projection.weight": "frame_embedding.weight",
    "encoder_down_projection.bias": "frame_embedding.bias",
}
_VARIANTS = ("time_embed", "adaln", "default")


def video_our_key(reference_key: str) -> str:
    """Our parameter name for one of the paper's video-EBT parameters."""
    name = reference_key.removeprefix("model.").replace("_orig_mod.", "")
    return _FRAME_RULES.get(name) or our_key(name)


def convert_video_state_dict(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's video-EBT state_dict renamed to ours (tensors shared)."""
    return {video_our_key(key): value for key, value in reference.items()}


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
