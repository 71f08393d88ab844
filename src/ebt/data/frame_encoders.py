"""Frame encoders for video: what one frame becomes before the model sees it.

- ``pixels`` (the offline default): the frame itself, flattened, 3 x F x F numbers in [-1, 1].
- ``vae``: a frozen diffusers ``AutoencoderKL`` (the paper's ``stabilityai/sd-vae-ft-mse``, or
  any local directory holding one): the mean of its latent distribution, times
  ``data.vae_scaling`` (the SD constant 0.18215 with the paper's ``--sdxl_vae_standardization``),
  flattened: C x (F / d)^2 numbers (4 x 28 x 28 = 3136 for 224 x 224 frames).

Encoding through a VAE costs far more than a training step of a small model, so VAE latents are
computed once and cached on disk (`FrameCache`), addressed by the encoder's fingerprint (its
config, scaling and a hash of its weights) and the content of the frames encoded (so any change
to a source, a generator or its settings makes new entries, never stale ones). File videos are
encoded whole, once per video; generated clips once per clip. `EncodedClips` wraps a clip set
so its batches are frame vectors (B, T, frame_dim); `decode` turns vectors back into frames for
viewing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from ebt.config_checks import CHANNELS, frame_dim
from ebt.data.images import to_float
from ebt.data.loader import cache_dir
from ebt.errors import DataError, MachineError
from ebt.outputs import atomic_path, write_bytes
from ebt.runtime import pick_device

if TYPE_CHECKING:
    from ebt.config import Config

ENCODERS = ("pixels", "vae")


class FrameEncoder(Protocol):
    """Frames (N, 3, F, F) in [-1, 1] <-> frame vectors (N, frame_dim)."""

    name: str

    def frame_dim(self, frame_size: int) -> int: ...

    def encode(self, frames: torch.Tensor) -> torch.Tensor: ...

    def decode(self, vectors: torch.Tensor, frame_size: int) -> torch.Tensor: ...

    def fingerprint(self) -> dict[str, Any]: ...


class PixelEncoder:
    """The frame as it is, flattened: 3 * F^2 numbers (nothing to cache)."""

    name = "pixels"

    def frame_dim(self, frame_size: int) -> int:
        return CHANNELS * frame_size**2

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (N, 3, F, F) -> (N, 3 F^2)."""
        return frames.flatten(1)  # (N, 3 F^2)

    def decode(self, vectors: torch.Tensor, frame_size: int) -> torch.Tensor:
        """Vectors (N, 3 F^2) -> frames (N, 3, F, F) clamped to [-1, 1]."""
        return vectors.view(-1, CHANNELS, frame_size, frame_size).clamp(-1, 1)  # (N, 3, F, F)

    def fingerprint(self) -> dict[str, Any]:
        return {"encoder": self.name}


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@functools.cache
def _load_vae(spec: str) -> Any:
    """A frozen AutoencoderKL in eval mode from a local directory or a hub id (cached)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DataError("data.frame_encoder=vae needs diffusers: pip install diffusers") from None
    local = Path(spec).expanduser()
    try:
        vae = AutoencoderKL.from_pretrained(str(local) if local.exists() else spec)
    except Exception as error:  # diffusers / hub raise many types (missing, offline, corrupt)
        hint = "" if local.exists() else " (a hub id needs the network or a local copy in data.vae)"
        raise DataError(f"cannot load the VAE '{spec}': {_first_line(error)}{hint}") from None
    return vae.eval().requires_grad_(False)


class VaeEncoder:
    """A frozen diffusers AutoencoderKL: the latent mean times `scaling`, flattened."""

    name = "vae"

    def __init__(
        self, spec: str, scaling: float = 1.0, batch_size: int = 16, device: str = "cpu"
    ) -> None:
        self.spec, self.scaling, self.batch_size = spec, scaling, batch_size
        self.vae = _load_vae(spec).to(device)
        config = self.vae.config
        self.channels = int(config.latent_channels)
        self.downsampling = 2 ** (len(config.block_out_channels) - 1)
        self.encoded_frames = 0  # frames run through the VAE by this encoder (cache misses)

    def check(self, frame_size: int) -> None:
        """Raise DataError if the VAE cannot take frames of this side."""
        if frame_size <= 0 or frame_size % self.downsampling:
            raise DataError(
                f"frame size {frame_size} does not fit the VAE '{self.spec}': its frames must "
                f"be a positive multiple of {self.downsampling} pixels (set data.frame_size)"
            )

    def frame_dim(self, frame_size: int) -> int:
        self.check(frame_size)
        return self.channels * (frame_size // self.downsampling) ** 2

    @property
    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (N, 3, F, F) in [-1, 1] -> latent means (N, C (F/d)^2), float32, on CPU."""
        self.check(frames.shape[-1])
        parts = []
        for chunk in frames.split(self.batch_size):  # (n, 3, F, F)
            pixels = chunk.to(self._device, torch.float32)
            latents = self.vae.encode(pixels).latent_dist.mean * self.scaling  # (n, C, h, w)
            parts.append(latents.flatten(1).float().cpu())  # (n, C h w)
        self.encoded_frames += frames.shape[0]
        return torch.cat(parts)  # (N, C h w)

    @torch.no_grad()
    def decode(self, vectors: torch.Tensor, frame_size: int) -> torch.Tensor:
        """Latent vectors (N, C (F/d)^2) -> frames (N, 3, F, F) in [-1, 1], on CPU."""
        side = frame_size // self.downsampling
        latents = vectors.reshape(-1, self.channels, side, side) / self.scaling  # (N, C, h, w)
        parts = []
        for chunk in latents.split(self.batch_size):
            decoded = self.vae.decode(chunk.to(self._device, torch.float32)).sample
            parts.append(decoded.clamp(-1, 1).float().cpu())  # (n, 3, F, F)
        return torch.cat(parts)  # (N, 3, F, F)

    @functools.cached_property
    def _weights_hash(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in self.vae.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def fingerprint(self) -> dict[str, Any]:
        """What determines the latents: the VAE's config and weights, the scaling."""
        config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
        return {
            "encoder": self.name,
            "config": json.loads(json.dumps(config, default=str)),
            "weights": self._weights_hash,
            "scaling": self.scaling,
        }


def build_frame_encoder(config: Config) -> FrameEncoder:
    """The encoder data.frame_encoder names (a VAE loads from data.vae)."""
    data = config.data
    if data.frame_encoder == "pixels":
        return PixelEncoder()
    if data.frame_encoder == "vae":  # on the training device (its local rank's GPU under torchrun)
        device = pick_device(config.train.device, int(os.environ.get("LOCAL_RANK", "0")))
        return VaeEncoder(data.vae, data.vae_scaling, device=str(device))
    raise DataError(f"data.frame_encoder={data.frame_encoder!r}: use one of {', '.join(ENCODERS)}")


def frame_cache_root(config: Config) -> Path:
    """data.cache_dir, or `$EBT_CACHE_DIR/frames` (default ~/.cache/ebt/frames)."""
    chosen = config.data.cache_dir
    return Path(chosen).expanduser() if chosen else cache_dir() / "frames"


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


class FrameCache:
    """Encoded frames on disk, one safetensors file per encoded stack of frames, under
    root / <encoder key> / <content key>.safetensors (written atomically)."""

    def __init__(self, encoder: FrameEncoder, root: str | Path) -> None:
        self.encoder = encoder
        fingerprint = json.dumps(encoder.fingerprint(), sort_keys=True).encode()
        self.directory = Path(root) / _digest(fingerprint)[:20]
        self.hits = self.misses = 0
        self._fingerprint = fingerprint
        self._writable = True  # False after a write failed (full or read-only disk): said once

    def path(self, frames: torch.Tensor) -> Path:
        """Where the encoding of frames (N, 3, F, F) lives (the key hashes their content)."""
        pixels = frames.detach().cpu().contiguous()
        header = f"{pixels.dtype}:{tuple(pixels.shape)}".encode()
        key = _digest(header, pixels.view(torch.uint8).numpy().tobytes())
        return self.directory / key[:2] / f"{key}.safetensors"

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frame vectors (N, frame_dim) of frames (N, 3, F, F): read, or encoded and written."""
        path = self.path(frames)
        if path.exists():
            try:
                vectors = load_file(path)["vectors"]
                if vectors.shape[0] == frames.shape[0]:
                    self.hits += 1
                    return vectors  # (N, frame_dim)
            except Exception:  # a torn or foreign file: encode again and replace it
                pass
        self.misses += 1
        vectors = self.encoder.encode(frames).contiguous()  # (N, frame_dim)
        if self._writable:
            self._write_or_warn(path, vectors)
        return vectors

    def _write_or_warn(self, path: Path, vectors: torch.Tensor) -> None:
        """A cache is not an output: on a full or read-only disk the run goes on without it
        (encoding again when needed) and says so once on stderr, as the token cache does."""
        try:
            self._write(path, vectors)
        except (OSError, MachineError) as error:
            self._writable = False
            print(
                f"ebt: could not write the frame cache in {self.directory}: {error}",
                file=sys.stderr,
            )

    def _write(self, path: Path, vectors: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        info = self.directory / "encoder.json"
        if not info.exists():
            write_bytes(info, self._fingerprint, durable=False)
        with atomic_path(path, durable=False) as temporary:
            save_file({"vectors": vectors}, str(temporary))


class EncodedClips:
    """A clip set whose batches are frame vectors (B, T, frame_dim) from a cached encoder.

    Video files (`VideoClips`) are encoded once per video and clips cut from the vectors;
    generated clips (pan, faces: new every epoch) are encoded once per clip.
    """

    def __init__(self, clips: Any, cache: FrameCache) -> None:
        self.clips, self.cache = clips, cache
        self.source, self.split = clips.source, clips.split
        self._videos: dict[int, torch.Tensor] = {}  # video number -> (N_i, frame_dim)

    def __len__(self) -> int:
        return len(self.clips)

    def _video(self, number: int) -> torch.Tensor:
        if number not in self._videos:
            frames = to_float(self.clips.videos[number])  # (N_i, 3, F, F)
            self._videos[number] = self.cache.encode(frames)  # (N_i, frame_dim)
        return self._videos[number]

    def clip(self, index: int, epoch: int = 0) -> torch.Tensor:
        """Clip `index` of `epoch` as frame vectors (T, frame_dim)."""
        if hasattr(self.clips, "starts"):  # a VideoClips: cut from the whole video's vectors
            number, first = self.clips.starts[index]
            return self._video(number)[first : first + self.clips.frames]  # (T, frame_dim)
        return self.cache.encode(self.clips.clip(index, epoch))  # (T, frame_dim)

    def batch(self, indices: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """Clips `indices` of `epoch` as frame vectors (B, T, frame_dim)."""
        return torch.stack([self.clip(int(i), epoch) for i in indices])  # (B, T, frame_dim)


def encoded_dataset(clips: Any, config: Config) -> Any:
    """`clips` as the model reads them: unchanged for pixels (the task flattens the frames),
    `EncodedClips` for a VAE. Raises DataError if the encoder's frame vectors do not have the
    model's frame_dim or the encoder cannot take the frame size."""
    encoder = build_frame_encoder(config)
    size = _frame_side(clips, config)
    produced, expected = encoder.frame_dim(size), frame_dim(config)
    if produced != expected:
        raise DataError(
            f"the {encoder.name} encoder makes {produced} numbers of a {size} x {size} frame but "
            f"the model reads {expected} (data.frame_dim={config.data.frame_dim}; set it to 0)"
        )
    if isinstance(encoder, PixelEncoder):
        return clips
    return EncodedClips(clips, FrameCache(encoder, frame_cache_root(config)))


def _frame_side(clips: Any, config: Config) -> int:
    """The side of the clips' frames (file videos read at their own size have theirs)."""
    videos = getattr(clips, "videos", None)
    if videos:
        return int(videos[0].shape[-1])
    return int(getattr(clips, "frame_size", 0) or config.data.frame_size)
