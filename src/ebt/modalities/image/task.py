"""Images: denoising. A batch is clean images (B, 3, S, S) in [-1, 1]; the candidate is the
image itself, starting from the clean image noised at the task's level (the paper's linear-beta
diffusion schedule of data.diffusion_steps / data.noise_level steps), and the loss is SmoothL1
(beta 1) against the clean image. The baseline is a DiT trained with the improved-DDPM hybrid
loss and evaluated by deterministic DDIM from the level's timestep down to 0."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ebt.config import Config, ThinkConfig
from ebt.data.corpus import DataError
from ebt.data.images import EpochBatchIterator, build_image_dataset
from ebt.modalities.image.diffusion import GaussianDiffusion
from ebt.modalities.unit import ModalityUnit
from ebt.models import CHANNELS


def pixel_mse(images: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image (B,) on the 0-255 scale (the paper's `pixel_mse`), of images
    in [-1, 1] clamped to the valid range."""
    return ((images.clamp(-1, 1) - clean) * 127.5).square().flatten(1).mean(dim=1)  # (B,)


def psnr(images: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (B,): 10 log10(255^2 / pixel_mse)."""
    return 10 * torch.log10(255.0**2 / pixel_mse(images, clean).clamp(min=1e-12))


@dataclass
class ImageTask:
    """What the shared objective needs to know about denoising at one noise level."""

    diffusion: GaussianDiffusion
    noise_level: float
    weight_name = "images"  # what evaluation means are weighted by
    quality_keys = ("psnr", "mse")

    @property
    def timestep(self) -> int:
        return self.diffusion.timestep_for_level(self.noise_level)

    @property
    def baseline_forward_passes(self) -> int:
        """DDIM from the level's timestep down to 0: timestep + 1 DiT evaluations."""
        return self.timestep + 1

    def split(self, batch: torch.Tensor) -> tuple[None, torch.Tensor]:
        """(no context, the clean images (B, C, H, W) as targets)."""
        return None, batch

    def noise(self, clean: torch.Tensor) -> torch.Tensor:
        """The clean images (B, C, H, W) noised at the task's level (fresh noise)."""
        t = torch.full((clean.shape[0],), self.timestep, device=clean.device)  # (B,)
        return self.diffusion.q_sample(clean, t, torch.randn_like(clean))

    def initial_state(self, think_config: ThinkConfig, context, targets) -> torch.Tensor:
        return self.noise(targets)  # (B, C, H, W): thinking starts from the noisy image

    def step_size_shape(self, targets: torch.Tensor) -> tuple[int, ...]:
        """A per-image step size: (B, 1, 1, 1)."""
        return (targets.shape[0], *[1] * (targets.dim() - 1))

    def loss(self, state: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(state, targets, beta=1.0)

    def baseline_training_loss(self, model: nn.Module, context, targets) -> torch.Tensor:
        """DiT: the improved-DDPM hybrid loss at t ~ U[0, N)."""
        t = torch.randint(0, self.diffusion.steps, (targets.shape[0],), device=targets.device)
        noise = torch.randn_like(targets)
        return self.diffusion.training_losses(model, targets, t, noise).loss.mean()

    def baseline_prediction(self, model: nn.Module, context, targets) -> torch.Tensor:
        """DiT: deterministic DDIM from the images noised at the level's timestep down to 0
        (timestep + 1 model evaluations), comparable with the EBT's final step."""
        return self.diffusion.ddim(model, self.noise(targets), self.timestep)  # (B, C, H, W)

    def weight(self, batch: torch.Tensor) -> torch.Tensor:
        """How much a batch counts in an evaluation mean: its images."""
        return torch.tensor(float(batch.shape[0]), dtype=torch.float64, device=batch.device)

    def quality(self, state: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's 0-255 MSE and the PSNR of that batch-mean MSE, as the paper computes
        them (evaluation then averages over batches)."""
        mse = pixel_mse(state.detach(), targets).mean()
        return {"psnr": 10 * torch.log10(255.0**2 / mse.clamp(min=1e-12)), "mse": mse}

    def summarise(self, result: dict[str, Any]) -> dict[str, Any]:
        return result | {"noise_level": self.noise_level}


class ImageModality(ModalityUnit):
    """Image crops and the denoising task of a config."""

    name = "image"
    commands = "ebt denoise"
    default_metric = "psnr"
    metrics = ("loss", "psnr", "mse", "forward_passes")
    tokenizer = None

    @classmethod
    def example_batch(cls, config: Config, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Random images (B, 3, S, S) uniform in [-1, 1]."""
        size = config.data.image_size
        shape = (config.train.batch_size, CHANNELS, size, size)
        return torch.rand(*shape, device=device) * 2 - 1  # (B, 3, S, S)

    @classmethod
    def shape_keys(cls, config: Config) -> dict[str, Any]:
        """The crop size and the noise (level and schedule length)."""
        data = config.data
        return {
            "image_size": data.image_size,
            "noise_level": data.noise_level,
            "diffusion_steps": data.diffusion_steps,
        }

    def __init__(self, config: Config, tokenizer: Any = None) -> None:
        self.config = config
        data = config.data
        self.diffusion = GaussianDiffusion.for_noise_level(data.diffusion_steps, data.noise_level)

    def dataset(self, split: str, source: str | None = None):
        """Crops of a split: random for "train", a fixed grid otherwise ("ood" is the
        validation crops; it differs by its noise level, see task)."""
        data = self.config.data
        name = {"ood": "val"}.get(split, split)
        if (source or data.source) in ("stdlib", "pydoc"):
            raise DataError(
                f"data.source={source or data.source!r} is a text corpus; images come from "
                "skimage, image files, folders or globs, hf:NAME or hf-local:PATH"
            )
        return build_image_dataset(
            source or data.source,
            name,
            image_size=data.image_size,
            seed=self.config.train.seed,
            max_images=data.max_documents,
        )

    def batches(self, dataset, **kwargs: Any) -> EpochBatchIterator:
        return EpochBatchIterator(dataset, self.config.train.batch_size, **kwargs)

    def task(self, split: str = "val") -> ImageTask:
        data = self.config.data
        level = data.ood_noise_level if split == "ood" else data.noise_level
        return ImageTask(self.diffusion, level)

    def save_assets(self, run_dir: Path) -> None:
        """Nothing besides the checkpoint: images need no tokenizer."""
