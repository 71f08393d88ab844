"""Autoregressive rollout of video models: predict the next frame, append the *prediction* to the
context, repeat; PSNR / SSIM per horizon; cached-versus-recompute timing.

Cached (the KV cache): the video EBT keeps one context cache per landscape (stacked: one batch
row per landscape and clip, so a new frame extends all of them in one pass) and thinks only about
the newest frame; Transformer++ keeps its own per-layer cache. Recompute (no cache): every frame
re-encodes the whole visible sequence. Both draw the same random numbers in the same order, so
they agree to float rounding (tests check float64).

Window: a model reads at most `window` context frames (its trained clip length - 1: the
positions it was trained on end there). When the sequence outgrows it, the context restarts
from the newest `keep` frames (cached: the cache is rebuilt from them), in both modes alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.nn import functional as F

from ebt.config import Config
from ebt.data import frame_encoders
from ebt.data.images import to_float, to_uint8
from ebt.data.video import build_video_dataset
from ebt.data.video_files import SKIMAGE_GIF, read_video
from ebt.errors import DataError
from ebt.modalities.video.task import frame_mse, frame_psnr
from ebt.modalities.video.thinking import (
    FrameThinking,
    FrameVerdict,
    initial_frames,
    landscapes_of,
    think_next_frame,
)
from ebt.modalities.video.verification import energy_summary, patch_errors
from ebt.models import EnergyTransformer, TransformerPP

REPORTED_HORIZONS = (1, 4, 8)


class FramePredictor(Protocol):
    def start(self, frames: torch.Tensor) -> None: ...  # context frames (B, C, F)

    def predict(self) -> FrameVerdict: ...  # the next frame of every clip

    def append(self, frame: torch.Tensor) -> None: ...  # (B, F): extend the sequence


class _Window:
    """The growing sequence (B, T, F) and the part of it a model reads (`visible`)."""

    def __init__(self, window: int, keep: int = 0, cached: bool = True) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window, self.cached = window, cached
        self.keep = min(keep or (window + 1) // 2, window)
        self.history = torch.empty(0)
        self.first = 0

    @property
    def visible(self) -> torch.Tensor:
        return self.history[:, self.first :]  # (B, T', F), T' <= window

    def start(self, frames: torch.Tensor) -> None:
        if frames.shape[1] > self.window:
            raise ValueError(f"{frames.shape[1]} context frames; the model reads {self.window}")
        self.history, self.first = frames, 0
        if self.cached:
            self._rebuild()

    def append(self, frame: torch.Tensor) -> None:
        self.history = torch.cat((self.history, frame.unsqueeze(1)), dim=1)  # (B, T + 1, F)
        if self.history.shape[1] - self.first > self.window:
            self.first = self.history.shape[1] - self.keep
            if self.cached:
                self._rebuild()
        elif self.cached:
            self._extend(frame)

    def _rebuild(self) -> None: ...

    def _extend(self, frame: torch.Tensor) -> None: ...


class EnergyPredictor(_Window):
    """The video EBT: thinks about each next frame (see ebt.modalities.video.thinking)."""

    def __init__(
        self,
        model: EnergyTransformer,
        thinking: FrameThinking,
        window: int | None = None,
        keep: int = 0,
        cached: bool = True,
    ) -> None:
        super().__init__(window or model.args.max_seq_len, keep, cached)
        self.model, self.thinking = model, thinking
        self.landscapes = landscapes_of(model)
        self.state = None  # the stacked context cache (cached mode)

    def _stacked(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.repeat(len(self.landscapes), 1, 1)  # (L * B, T, F)

    @torch.no_grad()
    def _encode(self, capacity: int = 0):
        labels = torch.tensor(self.landscapes, device=self.history.device)  # (L,)
        labels = labels.repeat_interleave(self.history.shape[0])  # (L * B,)
        return self.model.encode_context(self._stacked(self.visible), labels, capacity)

    def _rebuild(self) -> None:
        self.state = self._encode(self.model.context_capacity(self.window))

    def _extend(self, frame: torch.Tensor) -> None:
        self.state = self.model.extend_context(self.state, self._stacked(frame.unsqueeze(1)))

    def caches(self) -> dict:
        """One cache per landscape: rows of the stacked cache (recompute: a fresh encoding)."""
        stacked = self.state if self.cached else self._encode()
        batch = self.history.shape[0]
        return {
            landscape: stacked.select(slice(i * batch, (i + 1) * batch), landscape)
            for i, landscape in enumerate(self.landscapes)
        }

    def predict(self) -> FrameVerdict:
        previous = self.history[:, -2] if self.history.shape[1] > 1 else None  # (B, F)
        starts = initial_frames(self.model, self.history[:, -1], self.thinking, previous)
        row = self.visible.shape[1] - 1  # the newest context frame
        return think_next_frame(self.model, self.caches(), starts, row, self.thinking)


class TransformerPredictor(_Window):
    """Transformer++ on frames: its output at the newest position is the next frame."""

    def __init__(
        self, model: TransformerPP, window: int | None = None, keep: int = 0, cached: bool = True
    ) -> None:
        super().__init__(window or model.args.max_seq_len, keep, cached)
        self.model = model
        self.state: list | None = None
        self.next: torch.Tensor | None = None  # cached mode: the prediction already computed

    @torch.no_grad()
    def _rebuild(self) -> None:
        capacity = self.model.context_capacity(self.window)
        out, self.state = self.model.forward_cached(self.visible, None, capacity)
        self.next = out[:, -1]  # (B, F)

    @torch.no_grad()
    def _extend(self, frame: torch.Tensor) -> None:
        out, self.state = self.model.forward_cached(frame.unsqueeze(1), self.state)
        self.next = out[:, -1]  # (B, F)

    @torch.no_grad()
    def predict(self) -> FrameVerdict:
        if self.cached:
            return FrameVerdict(self.next)
        return FrameVerdict(self.model(self.visible)[:, -1])  # (B, F)


class CopyLast(_Window):
    """The anchor every video model should beat: the next frame is the last one."""

    def __init__(self) -> None:
        super().__init__(window=2**31, cached=False)

    def predict(self) -> FrameVerdict:
        return FrameVerdict(self.history[:, -1], passes=0.0)


def predictor_for(
    model: torch.nn.Module,
    thinking: FrameThinking,
    window: int | None = None,
    keep: int = 0,
    cached: bool = True,
) -> FramePredictor:
    """The rollout predictor of a video model (EBT or Transformer++): it reads at most `window`
    context frames (default: its trained length), restarting from the newest `keep` (default
    half the window) when the sequence outgrows it; `cached`: the KV cache, else recompute."""
    if isinstance(model, EnergyTransformer) and model.args.frame_dim:
        return EnergyPredictor(model, thinking, window, keep, cached)
    if isinstance(model, TransformerPP) and model.args.frame_dim:
        return TransformerPredictor(model, window, keep, cached)
    raise ValueError(f"{type(model).__name__} is not a video model (frame_dim = 0)")


@dataclass
class Rollout:
    """Predicted frames (B, H, F); final energies and thinking steps (B, H) of an EBT (else
    None); energy evaluations per frame; wall-clock milliseconds per frame; final energies per
    patch (B, H, P) of a patch-token EBT."""

    frames: torch.Tensor
    energies: torch.Tensor | None
    steps: torch.Tensor | None
    passes: float
    ms_per_frame: float
    patch_energies: torch.Tensor | None = None  # (B, H, P): patch-token EBTs


def rollout(predictor: FramePredictor, context: torch.Tensor, horizon: int) -> Rollout:
    """Predict `horizon` frames after context frames (B, C, F), each from the predictions
    before it."""
    began = time.perf_counter()
    predictor.start(context)
    verdicts = []
    for index in range(horizon):
        verdicts.append(predictor.predict())
        if index + 1 < horizon:
            predictor.append(verdicts[-1].frames)
    elapsed = (time.perf_counter() - began) * 1e3 / horizon
    frames = torch.stack([v.frames for v in verdicts], dim=1)  # (B, H, F)
    thinks = verdicts[0].energies is not None
    energies = torch.stack([v.energies for v in verdicts], dim=1) if thinks else None  # (B, H)
    steps = torch.stack([v.steps for v in verdicts], dim=1) if thinks else None  # (B, H)
    passes = statistics.fmean(v.passes for v in verdicts)
    patches = None
    if verdicts[0].patch_energies is not None:
        patches = torch.stack([v.patch_energies for v in verdicts], dim=1)  # (B, H, P)
    return Rollout(frames.detach(), energies, steps, passes, elapsed, patches)


def frame_ssim(frames: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """SSIM (scikit-image, 0-255 scale) of every frame (B, H, 3, S, S) in [-1, 1]: (B, H)."""
    from skimage.metrics import structural_similarity

    side = frames.shape[-1]
    window = min(7, side if side % 2 else side - 1)  # odd, at most the frame's side
    if window < 3:
        raise ValueError(f"SSIM needs frames at least 3 pixels wide, got {side}")
    ours = to_uint8(frames).flatten(0, 1).permute(0, 2, 3, 1).numpy()  # (B*H, S, S, 3)
    real = to_uint8(truth).flatten(0, 1).permute(0, 2, 3, 1).numpy()
    values = [
        structural_similarity(a, b, data_range=255, channel_axis=-1, win_size=window)
        for a, b in zip(ours, real, strict=True)
    ]
    return torch.tensor(values, dtype=torch.float64).view(frames.shape[:2])  # (B, H)


def horizon_metrics(
    frames: torch.Tensor, truth: torch.Tensor, losses: torch.Tensor | None = None
) -> dict:
    """PSNR (dB), SSIM and loss of predicted frames (B, H, 3, S, S) against the true ones: per
    horizon (means over clips; `all`), at the reported horizons, and overall. losses (B, H):
    the model's own per-frame loss (default SmoothL1 on the pixels)."""
    psnr = frame_psnr(frames.flatten(2).double(), truth.flatten(2).double())  # (B, H)
    ssim = frame_ssim(frames, truth)  # (B, H)
    if losses is None:
        losses = frame_loss(frames.flatten(2), truth.flatten(2))  # (B, H)
    per = {"psnr": psnr.mean(0), "ssim": ssim.mean(0), "loss": losses.double().mean(0)}  # (H,)
    result: dict = {name: float(values.mean()) for name, values in per.items()}
    result["all"] = {name: [round(float(v), 6) for v in values] for name, values in per.items()}
    result["horizons"] = {
        str(h): {name: float(values[h - 1]) for name, values in per.items()}
        for h in REPORTED_HORIZONS
        if h <= frames.shape[1]
    }
    return result


def frame_loss(frames: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The training loss per frame (B, H), SmoothL1 (beta 1), of frame vectors (B, H, F)."""
    loss = F.smooth_l1_loss(frames.double(), truth.double(), reduction="none", beta=1.0)
    return loss.mean(-1)  # (B, H)


def benchmark(
    make: Callable[[bool], FramePredictor],
    context: torch.Tensor,
    horizon: int,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Median milliseconds per rolled-out frame with the KV cache and with recompute (make(cached)
    builds a predictor), interleaved rollout by rollout after one warm-up each (so machine noise
    hits both alike), the median of the paired ratios, and the largest difference of frames."""
    times: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    for index in range(repeats + 1):
        for cached in (True, False):
            torch.manual_seed(seed)
            result = rollout(make(cached), context, horizon)
            times[cached] += [result.ms_per_frame] if index else []
            outputs[cached] = result.frames
    ratios = [slow / fast for fast, slow in zip(times[True], times[False], strict=True)]
    return {
        "cached_ms_per_frame": statistics.median(times[True]),
        "recompute_ms_per_frame": statistics.median(times[False]),
        "speedup": statistics.median(ratios),
        "max_abs_difference": float((outputs[True] - outputs[False]).abs().max()),
        "repeats": repeats,
    }


def run_clips(config: Config, split: str, length: int, count: int) -> torch.Tensor:
    """Up to `count` clips (B, length, 3, S, S) in [-1, 1] of `split` of the run's own data
    source (pan / faces: "val", "test", "ood"; files: their time split), evenly spaced."""
    data = config.data
    dataset = build_video_dataset(
        data.source,
        split,
        frames=length,
        frame_size=data.frame_size,
        seed=config.train.seed,
        stride=data.frame_stride,
        num_clips=count,
    )
    chosen = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().long()
    return dataset.batch(chosen.unique())  # (B, length, 3, S, S)


def video_file_clips(
    path: str, context: int, length: int, count: int, frame_size: int, stride: int = 1
) -> torch.Tensor:
    """Up to `count` evenly spaced clips (B, L, 3, S, S) in [-1, 1] of a video file or folder of
    frames, L = min(length, its frames); DataError (one line) if unreadable or shorter than
    context + 1 frames."""
    if path == "skimage-gif":  # the small animated GIF scikit-image ships
        from skimage import data

        path = str(Path(data.data_dir) / SKIMAGE_GIF)
    video = read_video(path, frame_size=frame_size, stride=stride)  # (N, 3, S, S) uint8
    frames = video.shape[0]
    if frames < context + 1:
        sampled = f"{frames} frames" + (f" at stride {stride}" if stride > 1 else "")
        raise DataError(
            f"video '{path}' has {sampled}; --context {context} needs at least {context + 1}"
        )
    length = min(length, frames)
    starts = torch.linspace(0, frames - length, min(count, frames - length + 1)).round().long()
    return to_float(torch.stack([video[s : s + length] for s in starts.unique().tolist()]))


class FrameCodec:
    """Pixel clips <-> the run's frame vectors (data.frame_encoder): pixels are flattened; a VAE
    encodes (through the on-disk frame cache) and decodes its latents for scoring and viewing."""

    def __init__(self, config: Config) -> None:
        self.encoder = frame_encoders.build_frame_encoder(config)
        self.size = config.data.frame_size
        pixels = isinstance(self.encoder, frame_encoders.PixelEncoder)
        root = frame_encoders.frame_cache_root(config)
        self.cache = None if pixels else frame_encoders.FrameCache(self.encoder, root)

    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips (B, L, 3, S, S) in [-1, 1] -> frame vectors (B, L, F)."""
        frames = clips.flatten(0, 1)  # (B L, 3, S, S)
        vectors = self.cache.encode(frames) if self.cache else self.encoder.encode(frames)
        return vectors.reshape(*clips.shape[:2], -1)  # (B, L, F)

    def decode(self, vectors: torch.Tensor) -> torch.Tensor:
        """Frame vectors (B, H, F) -> frames (B, H, 3, S, S) in [-1, 1]."""
        frames = self.encoder.decode(vectors.flatten(0, 1).contiguous(), self.size)
        return frames.reshape(*vectors.shape[:2], *frames.shape[1:])  # (B, H, 3, S, S)


def model_report(
    predictor: FramePredictor,
    context: torch.Tensor,
    truth: torch.Tensor,
    clips: torch.Tensor,
    codec: FrameCodec,
) -> tuple[dict, Rollout]:
    """Roll out len(truth) frames after context (B, C, F) and score them: PSNR / SSIM of the
    decoded frames against the real ones, the last H frames of clips (B, L, 3, S, S); the loss
    against the true frame vectors truth (B, H, F); ms and energy evaluations per frame; for an
    EBT the energy_summary (final energy and steps per horizon; its correlations with the pixel
    MSE, per frame and, for patch tokens, per patch). A one-frame rollout of one clip first warms
    the predictor up (its time not reported)."""
    state = torch.get_rng_state()
    rollout(predictor, context[:1], 1)
    torch.set_rng_state(state)  # the warm-up draws nothing the reported rollout would see
    result = rollout(predictor, context, truth.shape[1])
    images, real = codec.decode(result.frames), clips[:, -truth.shape[1] :]  # (B, H, 3, S, S)
    report = horizon_metrics(images, real, frame_loss(result.frames, truth))
    report |= {"ms_per_frame": result.ms_per_frame, "forward_passes_per_frame": result.passes}
    if result.energies is not None:
        errors = frame_mse(images.flatten(2).double(), real.flatten(2).double())  # (B, H)
        per_patch = None
        if result.patch_energies is not None:
            per_patch = patch_errors(images, real, result.patch_energies.shape[-1])  # (B, H, P)
        patches = result.patch_energies
        report |= energy_summary(result.energies, result.steps, errors, patches, per_patch)
    return report, result
