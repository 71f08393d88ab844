"""Video: next-frame prediction. A batch is clips (B, T, 3, F, F) in [-1, 1] (or frame vectors
(B, T, frame_dim)); each frame is one token, flattened to a vector. The context is frames
0..T-2, the targets frames 1..T-1; a candidate is a next-frame vector per position
(B, T - 1, frame_dim), starting from Gaussian noise, stepped as it is, and the loss is SmoothL1
(beta 1) against the true next frame. The baseline is the Transformer++ on frame vectors,
trained with the same loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ebt.config import Config, DataConfig, ThinkConfig
from ebt.data.frame_encoders import build_frame_encoder, encoded_dataset
from ebt.data.images import EpochBatchIterator
from ebt.data.video import build_video_dataset
from ebt.modalities.text.task import initial_state
from ebt.modalities.unit import ModalityUnit
from ebt.models import frame_dim


def _training_motion(data: DataConfig) -> dict[str, Any]:
    """What only the training clips of pan get: box filtering and the slowest pan speed."""
    return {"supersample": data.train_supersample, "min_speed": data.train_min_pan_speed}


def frame_vectors(batch: torch.Tensor) -> torch.Tensor:
    """Clips (B, T, C, H, W) (or vectors (B, T, F)) as frame vectors (B, T, F)."""
    return batch.flatten(2)  # (B, T, F)


def frame_mse(frames: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean squared error per frame (B, S) on the 0-255 scale, of frame vectors (B, S, F) in
    [-1, 1] clamped to the valid range."""
    return ((frames.clamp(-1, 1) - truth) * 127.5).square().mean(dim=-1)  # (B, S)


def frame_psnr(frames: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per frame (B, S): 10 log10(255^2 / MSE)."""
    return 10 * torch.log10(255.0**2 / frame_mse(frames, truth).clamp(min=1e-12))  # (B, S)


@dataclass
class VideoTask:
    """What the shared objective needs to know about next-frame prediction."""

    weight_name = "frames"  # what evaluation means are weighted by: predicted frames
    baseline_forward_passes = 1  # Transformer++: one forward per frame
    quality_keys = ("psnr", "mse")
    # frame vectors (N, F) -> pixels (N, 3 S^2) in [-1, 1]: the VAE's decoder for latent runs,
    # so PSNR and MSE are of frames a person sees, never of latents; None: already pixels
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, S, F), next-frame targets (B, S, F)) of clips (B, S + 1, ...)."""
        frames = frame_vectors(batch)  # (B, S + 1, F)
        return frames[:, :-1], frames[:, 1:]

    def initial_state(self, think_config: ThinkConfig, context, targets) -> torch.Tensor:
        """Gaussian noise times think.init_scale, zeros, or (think.init = "last_frame") a copy
        of each position's last context frame, in frame space (B, S, F)."""
        if think_config.init == "last_frame":
            return context.detach().clone()  # (B, S, F): frame j predicts frame j + 1
        return initial_state(think_config, tuple(targets.shape), targets.device)

    def step_size_shape(self, targets: torch.Tensor) -> tuple[int, ...]:
        """A per-frame step size broadcasts over the frame vector: (B, S, 1)."""
        return (*targets.shape[:-1], 1)

    def loss(self, state: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(state, targets, beta=1.0)

    def baseline_training_loss(self, model: nn.Module, context, targets) -> torch.Tensor:
        return self.loss(model(context), targets)

    def baseline_prediction(self, model: nn.Module, context, targets) -> torch.Tensor:
        return model(context)  # (B, S, F) next frames

    def weight(self, batch: torch.Tensor) -> torch.Tensor:
        """How much a batch counts in an evaluation mean: its predicted frames."""
        count = batch.shape[0] * (batch.shape[1] - 1)
        return torch.tensor(float(count), dtype=torch.float64, device=batch.device)

    def quality(self, state: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Means over the batch's predicted frames of the per-frame PSNR and 0-255 MSE (of the
        decoded frames for latent runs)."""
        state = state.detach()
        if self.decode is not None:
            shape = state.shape[:-1]  # (B, S)
            state = self.decode(state.flatten(0, 1)).to(targets.device).view(*shape, -1)
            targets = self.decode(targets.flatten(0, 1)).to(state.device).view(*shape, -1)
        return {"psnr": frame_psnr(state, targets).mean(), "mse": frame_mse(state, targets).mean()}

    def summarise(self, result: dict[str, Any]) -> dict[str, Any]:
        return result


class _LazyDecoder:
    """Frame vectors (N, F) -> pixels (N, 3 S^2) through the run's frame encoder, built once,
    on first use."""

    def __init__(self, config: Config) -> None:
        self.config, self.encoder = config, None

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            self.encoder = build_frame_encoder(self.config)
        return self.encoder.decode(vectors, self.config.data.frame_size).flatten(1)


class VideoModality(ModalityUnit):
    """Video clips (offline generators or the user's files) and the next-frame task."""

    name = "video"
    commands = "ebt rollout"
    default_metric = "loss"
    metrics = ("loss", "psnr", "mse", "forward_passes")
    tokenizer = None

    @classmethod
    def example_batch(cls, config: Config, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Clips of frame vectors (B, T, frame_dim) from N(0, 1): already-encoded frames, e.g.
        VAE latents (drawn from torch's global generator)."""
        shape = (config.train.batch_size, config.data.frames, frame_dim(config))
        return torch.randn(*shape, device=device)  # (B, T, frame_dim)

    @classmethod
    def shape_keys(cls, config: Config) -> dict[str, Any]:
        """The clip length and the numbers per frame vector."""
        return {"frames": config.data.frames, "frame_dim": frame_dim(config)}

    @classmethod
    def fixed_data_keys(cls, config: Config) -> dict[str, Any]:
        """The frame size (the frame embedding's width), the clip length (the position table)
        and the encoder's numbers per frame (pixels / VAE latents)."""
        data = config.data
        return {
            "data.frame_size": data.frame_size,
            "data.frames": data.frames,
            "model.frame_dim": frame_dim(config),
        }

    def __init__(self, config: Config, tokenizer: Any = None) -> None:
        self.config = config

    def dataset(self, split: str, source: str | None = None):
        """Clips of a split: "train" (new clips every epoch), "val", "test" or "ood" (held-out
        photographs / faces at twice the speed) of pan / faces; video files split in time. Only
        the training clips of pan are box-filtered (`data.train_supersample`) and reach down to
        `data.train_min_pan_speed`."""
        data = self.config.data
        clips = build_video_dataset(
            source or data.source,
            split,
            frames=data.frames,
            frame_size=data.frame_size,
            seed=self.config.train.seed,
            stride=data.frame_stride,
            **(_training_motion(data) if split == "train" else {}),
        )
        return encoded_dataset(clips, self.config)  # frame_encoder=vae: cached latents

    def batches(self, dataset, **kwargs: Any) -> EpochBatchIterator:
        return EpochBatchIterator(dataset, self.config.train.batch_size, **kwargs)

    def task(self, split: str = "val") -> VideoTask:
        """The next-frame task; latent (VAE) runs measure quality on decoded frames (the VAE
        loads at the first evaluation: training steps never need pixels)."""
        if self.config.data.frame_encoder == "pixels":
            return VideoTask()
        return VideoTask(decode=_LazyDecoder(self.config))

    def save_assets(self, run_dir: Path) -> None:
        """Nothing besides the checkpoint: frames need no tokenizer."""
