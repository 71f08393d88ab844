"""The tiny image and video setups the image and video tests share: shrunk presets, random
float64 video models, a small random VAE, and a signal delivered at a known training step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from ebt.api import load_run
from ebt.checkpoint import load_model_state
from ebt.config import Config, config_from_dict, load_config
from ebt.data.loader import iter_eval_batches
from ebt.modalities import modality_for
from ebt.models import build_model
from ebt.training.tracking import read_metrics
from support import CONFIGS
from support.text import four_step_run

IMAGE_SHRINK = [  # 8 x 8 crops, width 16, one block, patches of 4 x 4, batches of 4
    "data.image_size=8",
    "model.dim=16",
    "model.layers=1",
    "model.heads=2",
    "model.patch_size=4",
    "train.batch_size=4",
]
VIDEO_SHRINK = [  # clips of 4 frames of 8 x 8, width 16, one block, batches of 4
    "model.patch_size=2",  # patch-token presets: 16 patches of 12 numbers a frame
    "data.frames=4",
    "data.frame_size=8",
    "model.dim=16",
    "model.layers=1",
    "model.heads=2",
    "train.batch_size=4",
]
IMAGE_SYSTEM2 = [
    "think.step_size_learnable=false",
    "think.step_size_random_scale=2",
    "think.random_steps=1",
    "think.random_steps_min=2",
    "think.langevin_noise=0.01",
    "think.replay_buffer=true",
    "think.truncate=true",
    "think.detach=false",
]
VIDEO_SYSTEM2 = ["think.landscapes=1", *IMAGE_SYSTEM2]
VISION_SYSTEM2 = {"image": IMAGE_SYSTEM2, "video": VIDEO_SYSTEM2}


def image_config(run_dir: Path, name: str = "tiny.toml", *overrides: str) -> Config:
    """A configs/image preset shrunk to IMAGE_SHRINK, trained 4 steps into `run_dir`."""
    return load_config(CONFIGS / "image" / name, image_overrides(run_dir) + list(overrides))


def vision_config(kind: str, run_dir: Path, *overrides: str) -> Config:
    """configs/<kind>/tiny.toml shrunk (8 x 8 images, or 4-frame 8 x 8 clips), 4 CPU steps."""
    build = image_config if kind == "image" else video_config
    return build(run_dir, "tiny.toml", *overrides)


def image_overrides(run_dir: Path) -> list[str]:
    """The overrides of image_config (for commands that take them as arguments)."""
    return IMAGE_SHRINK + four_step_run(run_dir)


def video_config(run_dir: Path, name: str = "tiny.toml", *overrides: str) -> Config:
    """A configs/video preset shrunk to VIDEO_SHRINK, trained 4 steps into `run_dir`."""
    return load_config(CONFIGS / "video" / name, video_overrides(run_dir) + list(overrides))


def video_overrides(run_dir: Path) -> list[str]:
    """The overrides of video_config (for commands that take them as arguments)."""
    return VIDEO_SHRINK + four_step_run(run_dir)


def video_model(
    variant: str = "time_embed", kind: str = "ebt", frames: int = 6, noise: float = 0.0
) -> torch.nn.Module:
    """A tiny float64 video model (random weights, frames of 3 x 2 x 2 = 12 numbers, width 16,
    two blocks, two landscapes) built through the public config path."""
    model = {"modality": "video", "kind": kind, "variant": variant, "dim": 16, "heads": 2}
    config = config_from_dict(
        {
            "model": model | {"layers": 2},
            "data": {"source": "pan", "frames": frames, "frame_size": 2},
            "think": {"step_size": 3.0, "landscapes": 2, "langevin_noise": noise},
        }
    )
    return build_model(config).double()


def write_tiny_vae(path: Path, blocks: int = 4, size: int = 16) -> Path:
    """A small randomly initialised diffusers AutoencoderKL saved to `path` (no download):
    4 latent channels, downsampling 2^(blocks - 1) (4 blocks: the paper's factor 8)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,) * blocks,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=size,
    )
    vae.save_pretrained(path)
    return path


def evaluation_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl evaluation rows (those with a split), in order."""
    return [row for row in read_metrics(run_dir) if "split" in row]


def events(run_dir: Path) -> list[dict]:
    """metrics.jsonl event rows (resume, interrupted), in order."""
    return [row for row in read_metrics(run_dir) if "event" in row]


def same_weights(first: Path, second: Path) -> bool:
    """Whether two runs' newest checkpoints hold bit-identical weights."""
    one, _ = load_model_state(first)
    other, _ = load_model_state(second)
    return one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


def recomputed_psnr(run_dir: Path) -> float:
    """The validation PSNR of a run's final model, recomputed outside evaluate(): the same
    seeded batches and starts (the trainer's eval protocol), the model's own `think` (the DiT:
    DDIM; the video Transformer++: its forward), and PSNR written out from its definition:
    images 10 log10(255^2 / MSE) of each batch's mean 0-255 MSE, video of each frame's; then
    the mean over images / predicted frames. float64 from the model's output on."""
    loaded = load_run(run_dir)
    model, config = loaded.model, loaded.config
    modality = modality_for(config)
    task, train = modality.task("val"), config.train
    batches = iter_eval_batches(modality.dataset("val"), train.batch_size, train.eval_batches)
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        for batch in batches:
            psnr = _psnr_of_batch(model, config, task, batch)  # (images,) or (frames,)
            total, count = total + float(psnr.sum()), count + psnr.numel()
    return total / count


def _psnr_of_batch(model, config: Config, task, batch: torch.Tensor) -> torch.Tensor:
    """PSNR per image (all equal to the batch's) or per predicted frame of one batch."""
    context, targets = task.split(batch)
    image = config.model.modality == "image"
    if config.model.kind == "dit":
        prediction = task.diffusion.ddim(model, task.noise(targets), task.timestep)  # (B, C, H, W)
    elif config.model.kind == "transformer_pp":
        prediction = model(context)  # (B, S, F)
    else:
        start = task.initial_state(config.think, context, targets)
        trajectory = model.think(start) if image else model.think(context, init=start)
        prediction = trajectory.states[-1]  # (B, C, H, W) or (B, S, F)
    error = (prediction.detach().double().clamp(-1, 1) - targets.double()) * 127.5
    if image:
        mse = error.square().mean()  # the batch's mean 0-255 MSE
        return (10 * torch.log10(255.0**2 / mse)).expand(targets.shape[0])  # (B,)
    return (10 * torch.log10(255.0**2 / error.square().mean(dim=-1))).flatten()  # (B * S,)


@contextlib.contextmanager
def count_calls(owner: object, name: str) -> Iterator[list[int]]:
    """Count the calls of `owner.name` (a module function or a method) while inside: yields a
    list that grows by one per call; the original is put back afterwards."""
    original, calls = getattr(owner, name), []

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    try:
        yield calls
    finally:
        setattr(owner, name, original)


# Patch-token video models (model.frame_tokens = "patches"): 5-frame clips of 4 x 4 frames,
# 2 x 2 patches (4 patches of 12 numbers a frame), width 16, two blocks, two landscapes
PATCH_SIZE, PATCH, PATCH_FRAMES, PATCH_BATCH = 4, 2, 5, 2
PATCH_FRAME_DIM, PATCHES = 3 * PATCH_SIZE * PATCH_SIZE, (PATCH_SIZE // PATCH) ** 2


def patch_config(variant="time_embed", kind="ebt", noise=0.0, **model) -> Config:
    """The config of a tiny patch-token video model (model keys override the defaults)."""
    keys = {"modality": "video", "kind": kind, "variant": variant, "dim": 16, "heads": 2}
    keys |= {"layers": 2, "frame_tokens": "patches", "patch_size": PATCH} | model
    return config_from_dict(
        {
            "model": keys,
            "data": {"source": "pan", "frames": PATCH_FRAMES, "frame_size": PATCH_SIZE},
            "think": {"step_size": 3.0, "landscapes": 2, "langevin_noise": noise},
        }
    )


def patch_model(variant="time_embed", kind="ebt", noise=0.0, **model) -> torch.nn.Module:
    """A tiny float64 patch-token video model with random weights (seed 0), eval mode."""
    torch.manual_seed(0)
    return build_model(patch_config(variant, kind, noise, **model)).double().eval()


def patch_frames(count: int, seed: int = 0) -> torch.Tensor:
    """The same random frames (PATCH_BATCH, count, PATCH_FRAME_DIM) in [-1, 1] per seed."""
    generator = torch.Generator().manual_seed(seed)
    shape = (PATCH_BATCH, count, PATCH_FRAME_DIM)
    values = torch.rand(*shape, dtype=torch.float64, generator=generator)
    return values * 2 - 1  # (B, T, F)
