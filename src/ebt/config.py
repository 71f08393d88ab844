"""Typed run configuration: dataclasses, TOML files, presets and dotted `key=value` overrides.

A config is four sections (`model`, `think`, `data`, `train`). Files are TOML with the same
sections; overrides are `section.key=value` strings. Unknown sections or keys fail with the list
of valid names, so a typo never silently trains the wrong model; every value is range- or
choice-checked when the config is resolved (`finalize`, `config_checks.RULES`), all problems in
one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebt.config_checks import (
    BASELINES,
    KINDS,
    MODALITIES,
    SELECTION_RULES,
    SELECTION_TEMPERATURE,
    THINK_INITS,
    VARIANTS,
    check_value,
    cross_checks,
)
from ebt.configs import find_config
from ebt.errors import ConfigError

__all__ = ["BASELINES", "KINDS", "MODALITIES", "VARIANTS", "Config", "ConfigError", "load_config"]

# The paper's size presets (layers, heads, dim); FFN width = dim unless `model.ffn_dim` is set.
SIZE_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 2, 64),
    "micro": (4, 4, 128),
    "4xs": (2, 2, 128),
    "3xs": (4, 4, 256),
    "xxs": (6, 6, 384),
    "2xs": (6, 6, 384),
    "xs": (12, 6, 384),
    "small": (12, 12, 768),
    "medium": (24, 16, 1024),
    "large": (24, 16, 1536),
    "xl": (24, 32, 2048),
}


@dataclass
class ModelConfig:
    modality: str = "text"  # text (next token) | image (denoising) | video (next frame)
    kind: str = "ebt"  # "ebt" (energy transformer) or the modality's baseline (BASELINES)
    variant: str = "time_embed"  # step conditioning: time_embed | adaln | default | pred_step
    size: str = ""  # a SIZE_PRESETS name; sets layers/heads/dim
    dim: int = 128
    layers: int = 4
    heads: int = 4
    ffn_dim: int = 0  # 0 means "= dim", as in the paper
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    patch_size: int = 4  # images, and video patch tokens: pixels per patch side
    frame_tokens: str = "frame"  # video: "frame" (one token per frame, the paper's) | "patches"
    frame_residual: bool = False  # video Transformer++ on patches: next frame = last + output


@dataclass
class ThinkConfig:
    """The optimisation of candidates ("thinking"), with the paper's System-1/2 knobs."""

    landscapes: int = 2  # distinct step embeddings (the paper's mcmc_num_steps)
    steps: int = 1  # steps per landscape when step counts are not randomised
    step_size: float = 500.0  # alpha
    step_size_learnable: bool = True
    step_size_lr_multiplier: float = 1500.0
    step_size_random_scale: float = 1.0  # s: per-token alpha ~ U[alpha/s, alpha*s] in training
    random_steps: int = 0  # R: steps per landscape ~ randint(min, R+2) in training
    random_steps_min: int = 0  # 0 means 1
    random_steps_final_landscape: bool = False  # randomise only the last landscape
    langevin_noise: float = 0.0  # std of Gaussian noise added to the state before each step
    replay_buffer: bool = False
    replay_buffer_size: int = 192
    replay_fraction: float = 0.5  # replayed rows per batch, as a fraction of the batch size
    truncate: bool = False  # only the last step carries second-order terms and the loss
    detach: bool = True  # detach the state between steps
    grad_clamp: float = 0.0  # clamp the step gradient to +-grad_clamp/alpha (0 = off)
    absolute_clamp: float = 0.0  # clamp the state to +-absolute_clamp (0 = off)
    init: str = THINK_INITS[0]  # initial candidate: random_noise | zeros | last_frame (video)
    init_scale: float = 1.0
    samples: int = 1  # candidates per token at inference (best-of-N by energy)
    # best-of-N at inference: lowest (final energy per token, the paper's rule) | weighted
    # (candidates' distributions averaged with weights softmax(-E / selection_temperature)) |
    # sequence (one candidate per sequence); `ebt think` / `ebt probe --selection` override it
    selection: str = SELECTION_RULES[0]
    selection_temperature: float = SELECTION_TEMPERATURE


@dataclass
class DataConfig:
    source: str = (
        "stdlib"  # stdlib | pydoc | path/glob[,path...] | hf:NAME[:CONFIG] | hf-local:PATH
    )
    text_field: str = "text"  # field holding the text in Hugging Face datasets
    tokenizer: str = "byte"  # byte | path to a tokenizer.json (or a directory holding one)
    seq_len: int = 128  # tokens fed to the model; examples hold seq_len + 1
    val_fraction: float = 0.05
    ood_source: str = "pydoc"
    max_documents: int = 0  # 0 = all
    pack: bool = True  # pack documents into a token stream (False: first seq_len+1 tokens of each)
    image_size: int = 32  # images: side of the square crops, in pixels
    noise_level: float = 0.1  # images: the training noise level (the paper's 0.1)
    ood_noise_level: float = 0.2  # images: the out-of-distribution level (the paper's 0.2)
    diffusion_steps: int = 100  # images: schedule of diffusion_steps / noise_level steps
    frames: int = 8  # video: frames per clip (frames - 1 context frames, each predicts the next)
    frame_size: int = 32  # video: side of the square frames (3 * frame_size^2 numbers a frame)
    frame_stride: int = 1  # video files: every frame_stride-th frame is sampled
    # video, pan: training clips box-filtered over train_supersample^2 samples a pixel (1: point
    # samples); val / test / ood clips stay point-sampled, so every figure stays comparable
    train_supersample: int = 1
    # video, pan: the slowest training pan in scene px/frame (0: still cameras too); val / test /
    # ood clips keep the 0.5 - 2 range
    train_min_pan_speed: float = 0.5
    frame_encoder: str = "pixels"  # video: pixels (resized, flattened) | vae (frozen latents)
    frame_dim: int = 0  # video: numbers per frame vector; 0 = the encoder's (see models.frame_dim)
    vae: str = "stabilityai/sd-vae-ft-mse"  # video, frame_encoder=vae: a local dir or a hub id
    vae_scaling: float = 1.0  # video: latents times this (the SD/SDXL constant is 0.18215)
    cache_dir: str = ""  # video: where encoded frames are cached; "" = $EBT_CACHE_DIR/frames


@dataclass
class TrainConfig:
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1.2e-3
    min_lr_ratio: float = 0.1  # every group decays to its own lr * min_lr_ratio
    warmup_steps: int = 100
    schedule_steps: int = 0  # cosine horizon; 0 = max_steps
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    eval_every: int = 200
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    out_dir: str = "runs/ebt"
    seed: int = 33
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16
    tf32: bool = True  # CUDA: float32 matrix products on TF32 tensor cores
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = torch default
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "ebt"
    parallel: str = "ddp"  # ddp | fsdp (FSDP2; used only under torchrun)
    activation_checkpointing: bool = False  # recompute each second-order thinking step
    compile: bool = False  # torch.compile the training passes (needs a C++ compiler on CPU)
    cuda_graphs: bool = False  # with compile on CUDA: mode="reduce-overhead" (CUDA graphs)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    think: ThinkConfig = field(default_factory=ThinkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid: {', '.join(sorted(valid))}."


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Turn `value` (from TOML, JSON or an override string) into the type of `default`."""
    target = type(default)
    if isinstance(value, str) and target is not str:
        text = value.strip()
        if target is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true/false, got '{value}'")
        try:
            if target is int and "e" in text.lower() and float(text).is_integer():
                return int(float(text))  # 1e3; 1.5e0 and 1e400 are refused below
            return target(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {target.__name__}, got '{value}'") from None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {target.__name__}, got {value!r}")
    return value


def _set(config: Config, section: str, key: str, value: Any) -> None:
    sections = [f.name for f in dataclasses.fields(config)]
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}'." + _suggest(section, sections))
    part = getattr(config, section)
    keys = [f.name for f in dataclasses.fields(part)]
    if key not in keys:
        message = f"unknown config key '{section}.{key}'."
        raise ConfigError(message + _suggest(key, keys))
    setattr(part, key, _coerce(value, getattr(part, key), f"{section}.{key}"))
    if section == "model" and key == "size" and config.model.size:
        _apply_size(config.model)


def _apply_size(model: ModelConfig) -> None:
    """Apply a `model.size` preset (layers, heads, dim) where it is set, so keys set after it
    (later in a file, or overrides) win; an unknown name fails in one line."""
    if model.size not in SIZE_PRESETS:
        message = f"model.size={model.size!r}: must be a preset."
        raise ConfigError(message + _suggest(model.size, list(SIZE_PRESETS)))
    model.layers, model.heads, model.dim = SIZE_PRESETS[model.size]
    model.size = ""


def apply_dict(config: Config, values: dict[str, Any]) -> Config:
    """Apply nested `{section: {key: value}}` values (a TOML file or a saved config.json)."""
    for section, entries in values.items():
        if not isinstance(entries, dict):
            raise ConfigError(f"config section '{section}' must be a table, got {entries!r}")
        for key, value in entries.items():
            _set(config, section, key, value)
    return config


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings, in order."""
    for item in overrides:
        name, sep, value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        _set(config, section, key, value)
    return config


def finalize(config: Config) -> Config:
    """Resolve presets and check every value (ranges, choices, combinations) before any use.

    All problems are reported together, in one line joined by "; ".
    """
    problems = []
    for section in dataclasses.fields(config):
        part = getattr(config, section.name)
        for item in dataclasses.fields(part):
            key = f"{section.name}.{item.name}"
            problems.append(check_value(key, getattr(part, item.name)))
    found = [problem for problem in problems if problem]
    if not found:
        found = cross_checks(config)
    if found:
        raise ConfigError("; ".join(found))
    return config


def _parse_file(path: Path) -> dict[str, Any]:
    """The values of a TOML or JSON config file; every failure is one line naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    values = _decode(path, text)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config must be a table of sections, got {values!r:.40}")
    return values


def _decode(path: Path, text: str) -> Any:
    """Parsed JSON (`.json`) or TOML; a syntax error names the file, line and column."""
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except json.JSONDecodeError as error:
        kind, why, where = "JSON", error.msg, (error.lineno, error.colno)
    except tomllib.TOMLDecodeError as error:  # "why (at line L, column C)" before Python 3.14
        kind, lines = "TOML", text.split("\n")
        found = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(error), re.DOTALL)
        why = found[1] if found else str(error).removesuffix(" (at end of document)")
        where = (found[2], found[3]) if found else (len(lines), len(lines[-1]) + 1)
    raise ConfigError(f"{path}: line {where[0]}, column {where[1]}: invalid {kind}: {why}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML or JSON file at `path`, then `overrides`; presets resolved last."""
    config = Config()
    if path is not None:
        found = find_config(path)
        if found is None:
            hint = "nor a shipped preset; `ebt presets` lists them"
            raise ConfigError(f"config file not found: {path} ({hint})")
        apply_dict(config, _parse_file(found))
    apply_overrides(config, overrides or [])
    return finalize(config)


def config_from_dict(values: dict[str, Any]) -> Config:
    return finalize(apply_dict(Config(), values))
