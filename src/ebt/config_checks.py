"""The checks a resolved config must pass: one rule per value (range or choice) and the
combinations between values. `config.finalize` runs them; every problem is one line."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ebt.data.probes import source_problems  # dyck / arithmetic parameters

if TYPE_CHECKING:
    from ebt.config import Config

VARIANTS = ("time_embed", "adaln", "default", "pred_step")
KINDS = ("ebt", "transformer_pp", "dit")
MODALITIES = ("text", "image", "video")
VAE_DOWNSAMPLING, VAE_CHANNELS = 8, 4  # the SD VAEs' latent geometry (224 x 224 -> 4 x 28 x 28)
CHANNELS = 3  # images and video frames are RGB
THINK_INITS = ("random_noise", "zeros", "last_frame")  # the first candidate; last_frame: video
# best-of-N rules (ebt.thinking.selection; the first, the paper's, is the default) and the
# temperature of `weighted`, in energy units: measured best on tiny-s2 (docs/verification.md)
SELECTION_RULES = ("lowest", "weighted", "sequence")
SELECTION_TEMPERATURE = 0.1
# the like-for-like baseline of each modality
BASELINES = {"text": "transformer_pp", "image": "dit", "video": "transformer_pp"}

# One rule per value: (check, what is allowed). Booleans need none (they are typed on input).
Rule = tuple[Callable[[Any], bool], str]


def _ge(low: float, note: str = "") -> Rule:
    """At least `low`; `note` says what the boundary value means, e.g. "0 = off"."""
    return (lambda value: value >= low), f">= {low}" + (f" ({note})" if note else "")


def _interval(spec: str) -> Rule:
    """A number in an interval written as "[0, 1)", "(0, 1]" or "[0, 1]"."""
    low, high = (float(part) for part in spec[1:-1].split(","))
    closed_low, closed_high = spec[0] == "[", spec[-1] == "]"

    def check(value: float) -> bool:
        above = value >= low if closed_low else value > low
        return above and (value <= high if closed_high else value < high)

    return check, f"in {spec}"


def _choice(*options: str) -> Rule:
    return (lambda value: value in options), "one of " + ", ".join(options)


POSITIVE: Rule = (lambda value: value > 0, "> 0")
NOT_EMPTY: Rule = (lambda value: bool(value.strip()), "a non-empty string")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
RULES: dict[str, Rule] = {
    "model.modality": _choice(*MODALITIES),
    "model.kind": _choice(*KINDS),
    "model.variant": _choice(*VARIANTS),
    "model.dim": _ge(1),
    "model.layers": _ge(1),
    "model.heads": _ge(1),
    "model.ffn_dim": _ge(0, "0 = dim"),
    "model.norm_eps": POSITIVE,
    "model.rope_theta": POSITIVE,
    "model.patch_size": _ge(1),
    "model.frame_tokens": _choice("frame", "patches"),
    "think.landscapes": _ge(1),
    "think.steps": _ge(1),
    "think.step_size": POSITIVE,
    "think.step_size_lr_multiplier": _ge(0),
    "think.step_size_random_scale": _ge(1, "1 = fixed"),
    "think.random_steps": _ge(0, "0 = off"),
    "think.random_steps_min": _ge(0, "0 = 1"),
    "think.langevin_noise": _ge(0, "0 = off"),
    "think.replay_buffer_size": _ge(1),
    "think.replay_fraction": _interval("(0, 1]"),
    "think.grad_clamp": _ge(0, "0 = off"),
    "think.absolute_clamp": _ge(0, "0 = off"),
    "think.init": _choice(*THINK_INITS),
    "think.init_scale": POSITIVE,
    "think.samples": _ge(1),
    "think.selection": _choice(*SELECTION_RULES),
    "think.selection_temperature": POSITIVE,
    "data.source": NOT_EMPTY,
    "data.text_field": NOT_EMPTY,
    "data.tokenizer": NOT_EMPTY,
    "data.seq_len": _ge(2),
    "data.val_fraction": _interval("[0, 1)"),
    "data.ood_source": NOT_EMPTY,
    "data.max_documents": _ge(0, "0 = all"),
    "data.image_size": _ge(2),
    "data.noise_level": _interval("(0, 1]"),
    "data.ood_noise_level": _interval("(0, 1]"),
    "data.diffusion_steps": _ge(1),
    "data.frames": _ge(2),
    "data.frame_size": _ge(2),
    "data.frame_stride": _ge(1),
    "data.train_supersample": _ge(1),
    "data.train_min_pan_speed": _interval("[0, 2]"),
    "data.frame_encoder": _choice("pixels", "vae"),
    "data.frame_dim": _ge(0, "0 = the encoder's"),
    "data.vae": NOT_EMPTY,
    "data.vae_scaling": POSITIVE,
    "data.cache_dir": (lambda value: "\n" not in value, 'a path ("" = $EBT_CACHE_DIR/frames)'),
    "train.batch_size": _ge(1),
    "train.grad_accum": _ge(1),
    "train.max_steps": _ge(1),
    "train.lr": POSITIVE,
    "train.min_lr_ratio": _interval("[0, 1]"),
    "train.warmup_steps": _ge(0),
    "train.schedule_steps": _ge(0, "0 = max_steps"),
    "train.weight_decay": _ge(0),
    "train.beta1": _interval("[0, 1)"),
    "train.beta2": _interval("[0, 1)"),
    "train.grad_clip": _ge(0, "0 = off"),
    "train.eval_every": _ge(0, "0 = only at the end"),
    "train.eval_batches": _ge(1),
    "train.log_every": _ge(0, "0 = only the last step"),
    "train.save_every": _ge(0, "0 = only at the end"),
    "train.keep_checkpoints": _ge(0, "0 = keep all"),
    "train.out_dir": NOT_EMPTY,
    "train.seed": (lambda value: -(2**63) <= value < 2**63, "in [-2**63, 2**63)"),
    "train.device": (lambda value: bool(DEVICE.fullmatch(value)), "auto, cpu, cuda, cuda:N or mps"),
    "train.precision": _choice("auto", "fp32", "bf16"),
    "train.num_threads": _ge(0, "0 = torch default"),
    "train.wandb_project": NOT_EMPTY,
    "train.parallel": _choice("ddp", "fsdp"),
}


def check_value(key: str, value: Any) -> str | None:
    """`key=value: must be ...` when `value` breaks its rule, else None."""
    rule = RULES.get(key)
    if rule is None or isinstance(value, bool):
        return None
    check, allowed = rule
    finite = not isinstance(value, float) or math.isfinite(value)
    if finite and check(value):
        return None
    kind = {int: "an integer ", float: "a number " if finite else "a finite number "}
    return f"{key}={value!r}: must be {kind.get(type(value), '')}{allowed}"


def cross_checks(config: Config) -> list[str]:
    """Checks between values that are each in range on their own."""
    model, think = config.model, config.think
    problems = _modality_checks(config)
    if model.dim % model.heads:
        problems.append(f"model.dim={model.dim} is not divisible by model.heads={model.heads}")
    elif (model.dim // model.heads) % 2:
        problems.append(
            f"model.dim / model.heads = {model.dim // model.heads} must be even (RoPE pairs)"
        )
    if config.train.cuda_graphs and not config.train.compile:
        problems.append(
            "train.cuda_graphs=true needs train.compile=true (graphs of compiled passes)"
        )
    problems += source_problems(config.data.source, "data.source")
    problems += source_problems(config.data.ood_source, "data.ood_source")
    if think.random_steps and think.random_steps_min > think.random_steps + 1:
        problems.append(
            f"think.random_steps_min={think.random_steps_min}: must be <= think.random_steps + 1"
            f" = {think.random_steps + 1}"
        )
    return problems


def _modality_checks(config: Config) -> list[str]:
    """The kind and sizes a modality admits."""
    model, data = config.model, config.data
    allowed = ("ebt", BASELINES[model.modality])
    if model.kind not in allowed:
        return [f"model.kind={model.kind!r}: a {model.modality} model must be one of {allowed}"]
    if model.modality == "image" and data.image_size % model.patch_size:
        return [
            f"data.image_size={data.image_size} is not a multiple of "
            f"model.patch_size={model.patch_size}"
        ]
    if model.modality == "image" and config.train.compile:
        return ["train.compile: the image models have no compiled passes; set it to false"]
    if model.modality != "video" and config.think.init == "last_frame":
        return [f"think.init='last_frame' is for video; a {model.modality} model cannot use it"]
    if model.modality == "video" and data.frame_encoder == "vae" and not data.frame_dim:
        if data.frame_size % VAE_DOWNSAMPLING:
            return [
                f"data.frame_size={data.frame_size} is not a multiple of {VAE_DOWNSAMPLING}, the "
                "VAE's downsampling factor (or set data.frame_dim for another VAE)"
            ]
    if model.frame_tokens == "patches" and _patch_token_checks(config):
        return _patch_token_checks(config)
    if model.frame_residual and model.frame_tokens != "patches":
        return ["model.frame_residual is for the video Transformer++ on patch tokens"]
    if model.modality == "video" and data.source.strip() in ("stdlib", "pydoc"):
        return [
            f"data.source={data.source!r} is a text corpus; video comes from pan, faces, "
            "skimage-gif, video files or a folder of frames"
        ]
    return []


def _patch_token_checks(config: Config) -> list[str]:
    """model.frame_tokens = "patches": pixel video frames cut into whole patches, each at most
    model.dim numbers (so thinking can move every pixel)."""
    model, data = config.model, config.data
    if model.modality != "video":
        return [
            f"model.frame_tokens='patches' is for video; a {model.modality} model has no frames"
        ]
    if data.frame_encoder != "pixels" or data.frame_dim:
        return ["model.frame_tokens='patches' needs pixel frames (data.frame_encoder='pixels')"]
    if data.frame_size % model.patch_size:
        return [
            f"data.frame_size={data.frame_size} is not a multiple of "
            f"model.patch_size={model.patch_size}"
        ]
    if model.kind == "ebt" and CHANNELS * model.patch_size**2 > model.dim:
        return [
            f"model.patch_size={model.patch_size}: a patch's {CHANNELS * model.patch_size**2} "
            f"numbers exceed model.dim={model.dim}, so thinking could not move every pixel"
        ]
    if model.frame_residual and model.kind == "ebt":
        return [
            "model.frame_residual is the Transformer++'s; the EBT starts from "
            "think.init='last_frame'"
        ]
    return []


def frame_dim(config: Config) -> int:
    """Numbers in one video frame vector (0 for other modalities): data.frame_dim when set,
    else the encoder's: RGB pixels, 3 * frame_size^2, or the SD VAEs' latents, 4 x (F/8)^2."""
    data = config.data
    if config.model.modality != "video":
        return 0
    if data.frame_dim:
        return data.frame_dim
    if data.frame_encoder == "vae":
        return VAE_CHANNELS * (data.frame_size // VAE_DOWNSAMPLING) ** 2
    return CHANNELS * data.frame_size**2
