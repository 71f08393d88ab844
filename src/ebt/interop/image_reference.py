"""The paper's image checkpoints (its denoising EBT and its DiT denoiser) in our layout.

Its Lightning checkpoints hold `state_dict` (keys under `model.`; the EBT's trunk under
`transformer.`, the DiT's under `diffusion_transformer.`) and `hyper_parameters`. These functions
rename the parameters both ways and read the model's shape from the hyper-parameters. The fixed
sin-cos position table (`pos_embed`) is stored by the paper but is not a parameter of ours: it
is checked against the table we build, then dropped (and written back on export).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ebt.models.dit import DiT, DiTArgs
from ebt.models.image_energy import ImageEnergyArgs, ImageEnergyTransformer
from ebt.nn.dit import sincos_position_table

POSITIONS = "pos_embed"
_TRUNK = r"(?:transformer|diffusion_transformer)"

# (paper name pattern without `model.` and the trunk prefix, our name), tried in order.
_TRUNK_RULES: list[tuple[str, str]] = [
    (r"x_embedder\.proj\.(weight|bias)", r"patch_embedding.projection.\1"),
    (r"t_embedder\.mlp\.(0|2)\.(weight|bias)", r"timestep_embedder.mlp.\1.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"blocks.\1.attention.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.attention.out.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.feed_forward.\2.\3"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"blocks.\1.modulation.1.\2"),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"{head}.modulation.1.\1"),
    (r"final_layer\.linear\.(weight|bias)", r"{head}.linear.\1"),
]
_INVERSE_TRUNK_RULES: list[tuple[str, str]] = [
    (r"patch_embedding\.projection\.(weight|bias)", r"x_embedder.proj.\1"),
    (r"timestep_embedder\.mlp\.(0|2)\.(weight|bias)", r"t_embedder.mlp.\1.\2"),
    (r"blocks\.(\d+)\.attention\.qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"blocks\.(\d+)\.attention\.out\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"blocks\.(\d+)\.feed_forward\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"blocks\.(\d+)\.modulation\.1\.(weight|bias)", r"blocks.\1.adaLN_modulation.1.\2"),
    (r"(?:energy|output)_head\.modulation\.1\.(weight|bias)", r"final_layer.adaLN_modulation.1.\1"),
    (r"(?:energy|output)_head\.linear\.(weight|bias)", r"final_layer.linear.\1"),
]
_EBT_RULES: dict[str, str] = {
    "alpha": "step_size",
    "langevin_dynamics_noise_std": "langevin_std",
    "learned_adaln_condition.weight": "condition.weight",
}


def is_dit_state(reference: dict[str, torch.Tensor]) -> bool:
    """Whether a paper state_dict is its DiT denoiser (else its bidirectional EBT)."""
    return any(_normalised(key).startswith("diffusion_transformer.") for key in reference)


def _normalised(name: str) -> str:
    return name.removeprefix("model.").replace("_orig_mod.", "")


def image_our_key(reference_key: str) -> str:
    """Our parameter name for one of the paper's image-model parameters."""
    name = _normalised(reference_key)
    if name in _EBT_RULES:
        return _EBT_RULES[name]
    trunk = re.match(rf"({_TRUNK})\.(.+)", name)
    if trunk:
        head = "output_head" if trunk.group(1) == "diffusion_transformer" else "energy_head"
        for pattern, replacement in _TRUNK_RULES:
            if re.fullmatch(pattern, trunk.group(2)):
                return re.sub(pattern, replacement.format(head=head), trunk.group(2))
    raise KeyError(f"no mapping for the paper's image parameter '{reference_key}'")


def image_reference_key(key: str, dit: bool) -> str:
    """The paper's name (without `model.`) for one of our image-model parameters."""
    inverse = {ours: theirs for theirs, ours in _EBT_RULES.items()}
    if key in inverse:
        return inverse[key]
    trunk = "diffusion_transformer" if dit else "transformer"
    for pattern, replacement in _INVERSE_TRUNK_RULES:
        if re.fullmatch(pattern, key):
            return f"{trunk}." + re.sub(pattern, replacement, key)
    raise KeyError(f"ebt image parameter '{key}' has no counterpart in the paper's code")


def convert_image_state_dict(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's image state_dict renamed to ours (tensors shared); its position table is
    checked against ours and dropped."""
    state = {}
    for key, value in reference.items():
        if _normalised(key).endswith(f".{POSITIONS}"):
            _check_positions(key, value)
            continue
        state[image_our_key(key)] = value
    return state


def _check_positions(key: str, table: torch.Tensor) -> None:
    patches, dim = table.shape[-2:]
    side = round(patches**0.5)
    ours = sincos_position_table(dim, side, side).to(table.dtype)  # (N, D)
    if side * side != patches or not torch.allclose(table.reshape(patches, dim), ours):
        raise ValueError(f"the paper's '{key}' is not the fixed sin-cos table ebt builds")


def image_reference_state_dict(
    state: dict[str, torch.Tensor], dit: bool, patches: int, prefix: str = "model."
) -> dict[str, torch.Tensor]:
    """Our image state_dict in the paper's names, its position table (1, N, D) included, as
    the paper's modules order it (first among the trunk's tensors)."""
    dim = state["patch_embedding.projection.weight"].shape[0]
    side = round(patches**0.5)
    trunk = "diffusion_transformer" if dit else "transformer"
    table = sincos_position_table(dim, side, side).float().unsqueeze(0)  # (1, N, D)
    table_key, out = f"{prefix}{trunk}.{POSITIONS}", {}
    for key, value in state.items():
        name = prefix + image_reference_key(key, dit)
        if table_key not in out and name.startswith(f"{prefix}{trunk}."):
            out[table_key] = table
        out[name] = value
    return _paper_order(out)


def _paper_order(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's FinalLayer registers its linear before its adaLN modulation (ours after)."""
    names = list(state)
    final = [name for name in names if ".final_layer." in name]  # contiguous: the head's
    if final:
        start = names.index(final[0])
        names[start : start + len(final)] = sorted(final, key=lambda n: ".linear." not in n)
    return {name: state[name] for name in names}


def _shape_args(hparams: dict[str, Any]) -> dict[str, Any]:
    height, width = hparams["image_dims"]
    if height != width or hparams.get("image_task", "denoising") != "denoising":
        raise ValueError("only the paper's square pixel-space denoising models are supported")
    dim = int(hparams["embedding_dim"])
    return {
        "image_size": int(height),
        "channels": 3,
        "patch_size": int(hparams["patch_size"]),
        "dim": dim,
        "layers": int(hparams["num_transformer_blocks"]),
        "heads": int(hparams["multiheaded_attention_heads"]),
        "ffn_dim": int(dim * float(hparams.get("ffn_dim_multiplier") or 1)),
    }


def image_model_from_reference(
    reference: dict[str, torch.Tensor], hparams: dict[str, Any]
) -> ImageEnergyTransformer | DiT:
    """Our model built from the paper's hyper-parameters, its weights loaded (strict)."""
    shape = _shape_args(hparams)
    if is_dit_state(reference):
        model: ImageEnergyTransformer | DiT = DiT(DiTArgs(**shape))
    else:
        model = ImageEnergyTransformer(
            ImageEnergyArgs(
                **shape,
                step_size=float(hparams.get("mcmc_step_size", 500.0)),
                step_size_learnable=bool(hparams.get("mcmc_step_size_learnable", False)),
                langevin_noise=float(hparams.get("langevin_dynamics_noise", 0.0)),
                landscapes=int(hparams.get("mcmc_num_steps", 1)),  # one step on each
                inference_steps=1,
            )
        )
    model.load_state_dict(convert_image_state_dict(reference), strict=True)
    return model
