"""Video clips for next-frame prediction: float32 (T, 3, F, F) in [-1, 1], deterministic per seed.

Sources (`source`):

- ``pan``: a camera over scikit-image's photographs (`ebt.data.images`) scaled to a short side of
  `SCENE_SCALE` frame widths. Clip k shows photograph k % n through a square window 1 to 2 frames
  wide, panning at `PAN_SPEED` scene px/frame in a random direction and zooming at up to
  `PAN_ZOOM` (log per frame), both times `speed_scale`; inside the photo when the path fits.
  Every frame pixel is one bilinear sample of the scene, or with `supersample` = S the mean of
  S x S samples spread over the pixel's area (a box filter, as a camera's pixel integrates light).
  `min_speed` lowers the slowest pan (0: still cameras too; default `PAN_SPEED[0]`).
- ``faces``: `lfw_subset` faces (its first 100), `face_size` wide (default frame_size // 2) on a
  plain background, moving at `FACE_SPEED` px/frame (times `speed_scale`) and bouncing off the
  frame's edges (sub-pixel, always wholly inside).
- ``skimage-gif``: the small animated GIF scikit-image ships (24 frames, 25 x 14, 70 ms apart).
- video files (GIF; MP4, AVI, MOV, WebM, MKV through imageio-ffmpeg: paths, globs, commas) or a
  folder of frames (natural name order): every `stride`-th frame (or one per `interval` seconds,
  the paper's 0.25 s), centre-cropped and resized to `frame_size` (0: as they are); a clip is
  `frames` consecutive sampled frames, one starting every `hop`.

Splits of ``pan`` / ``faces``: "train" (training photographs / faces, new clips every epoch),
"val" (the same, same speeds, fixed clips), "test" (held-out ones), "ood" (held-out, twice the
speed); held-out = the image "val" + "test" splits (faces alike). Clip k of epoch e is a pure
function of (seed, split, e, k). Files: "all"; several split like images; one is cut in time.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ebt.data import images
from ebt.data.corpus import DataError
from ebt.data.video_files import ClipSet, VideoClips, file_clips

PAN_SPEED = (0.5, 2.0)  # scene pixels per frame
PAN_ZOOM = 0.03  # largest |log zoom| per frame
SCENE_SCALE = 4  # a photograph's short side, in frame widths, for panning
FACE_SPEED = (1.0, 3.0)  # frame pixels per frame
SYNTHETIC_SPLITS = ("train", "val", "test", "ood")


def _grid(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """A sampling grid (T, F, F, 2) from x coordinates (T, F) of columns and y (T, F) of rows."""
    shape = (xs.shape[0], ys.shape[1], xs.shape[1])
    return torch.stack([xs[:, None, :].expand(shape), ys[:, :, None].expand(shape)], -1)


@dataclass(frozen=True)
class PanMotion:
    """The camera of one pan clip: speed (scene px/frame), angle (rad), zoom rate, window."""

    photo: int
    speed: float
    angle: float
    zoom_rate: float
    window: float  # initial window side / frame_size, in [1, 2]
    place: tuple[float, float]  # where in its feasible range the path starts, per axis


def _axis_path(extent: float, sizes: torch.Tensor, velocity: float, u: float) -> torch.Tensor:
    """Window centres (T,) along one axis: inside [0, extent] when the path fits there."""
    offset = velocity * torch.arange(sizes.numel(), dtype=torch.float32)  # (T,)
    low = float((sizes / 2 - offset).max())
    high = float((extent - sizes / 2 - offset).min())
    start = low + u * (high - low) if high >= low else (low + high) / 2
    return start + offset  # (T,)


@dataclass(kw_only=True)
class _Synthetic(ClipSet):
    """What the synthetic clip sets share: `num_clips` clips per epoch of `frames` frames."""

    num_clips: int
    frames: int = 8
    frame_size: int = 32
    speed_scale: float = 1.0
    seed: int = 0
    split: str = "train"

    def __len__(self) -> int:
        return self.num_clips


@dataclass(kw_only=True)
class PanZoomClips(_Synthetic):
    """Clips of a camera panning and zooming over photographs; see the module docstring."""

    scenes: list[torch.Tensor]  # each (3, h, w) float32 in [-1, 1]
    names: list[str]
    source: str = "pan"
    supersample: int = 1  # samples per pixel side (1: one point sample; S: a box of S x S)
    min_speed: float = PAN_SPEED[0]  # the slowest pan, scene px/frame (before speed_scale)

    def motion(self, index: int, epoch: int = 0) -> PanMotion:
        """The camera of clip `index` of `epoch`."""
        seed = images.sample_seed(self.seed, epoch, index, f"pan:{self.split}")
        draw = torch.rand(6, generator=torch.Generator().manual_seed(seed))
        low, high = self.min_speed, PAN_SPEED[1]
        speed = (low + (high - low) * float(draw[0])) * self.speed_scale
        angle, window, place = 2 * math.pi * float(draw[1]), 1 + float(draw[3]), draw[4:].tolist()
        zoom_rate = PAN_ZOOM * (2 * float(draw[2]) - 1) * self.speed_scale
        return PanMotion(index % len(self.scenes), speed, angle, zoom_rate, window, tuple(place))

    def clip(self, index: int, epoch: int = 0) -> torch.Tensor:
        """Clip `index` of `epoch`: float32 (T, 3, F, F)."""
        move, size = self.motion(index, epoch), self.frame_size
        scene, (height, width) = self.scenes[move.photo], self.scenes[move.photo].shape[1:]
        growth = torch.exp(move.zoom_rate * torch.arange(self.frames, dtype=torch.float32))  # (T,)
        start = min(move.window * size, min(height, width) / float(growth.max()))
        sizes = start * growth  # (T,)
        xs = _axis_path(width, sizes, move.speed * math.cos(move.angle), move.place[0])  # (T,)
        ys = _axis_path(height, sizes, move.speed * math.sin(move.angle), move.place[1])  # (T,)
        samples = size * self.supersample  # S F sample points a side
        base = (torch.arange(samples, dtype=torch.float32) + 0.5) / samples - 0.5  # (S F,)
        grid_x = 2 * (xs[:, None] + sizes[:, None] * base) / width - 1  # (T, S F)
        grid_y = 2 * (ys[:, None] + sizes[:, None] * base) / height - 1  # (T, S F)
        grid = _grid(grid_x, grid_y)  # (T, S F, S F, 2)
        source = scene[None].expand(self.frames, -1, -1, -1)  # (T, 3, h, w)
        out = F.grid_sample(source, grid, padding_mode="reflection", align_corners=False)
        if self.supersample > 1:
            out = F.avg_pool2d(out, self.supersample)  # (T, 3, F, F): the box over each pixel
        return out.clamp(-1.0, 1.0)  # (T, 3, F, F)


def bounce_track(
    start: torch.Tensor, velocity: torch.Tensor, steps: int, limit: float
) -> torch.Tensor:
    """Positions (..., steps, 2) from `start` (..., 2) at `velocity` (..., 2), reflected at the
    walls 0 and `limit` (a point bouncing inside [0, limit] at constant speed)."""
    times = torch.arange(steps, dtype=torch.float32)[:, None]  # (T, 1)
    raw = start[..., None, :] + velocity[..., None, :] * times  # (..., T, 2)
    wrapped = torch.remainder(raw, 2 * limit)  # (..., T, 2)
    return limit - (wrapped - limit).abs()  # (..., T, 2)


def _place(face: torch.Tensor, track: torch.Tensor, frame_size: int) -> torch.Tensor:
    """`face` (1, s, s) at top-left positions `track` (T, 2): (T, 2, F, F), values and coverage."""
    side, steps = face.shape[-1], track.shape[0]
    pixels = torch.arange(frame_size, dtype=torch.float32)  # (F,)
    u = 2 * (pixels[None, :] - track[:, :1]) / (side - 1) - 1  # (T, F) along x
    v = 2 * (pixels[None, :] - track[:, 1:]) / (side - 1) - 1  # (T, F) along y
    layers = torch.cat([face, torch.ones_like(face)])[None].expand(steps, -1, -1, -1)  # (T,2,s,s)
    return F.grid_sample(layers, _grid(u, v), align_corners=True)  # (T, 2, F, F)


@dataclass(kw_only=True)
class BouncingFaces(_Synthetic):
    """Faces bouncing inside the frame on a plain background; see the module docstring."""

    faces: torch.Tensor  # (N, 1, s, s) float32 in [-1, 1]
    num_faces: int = 1
    background: float = -1.0
    source: str = "faces"

    def tracks(self, index: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(face numbers (K,), top-left positions (K, T, 2)) of clip `index` of `epoch`."""
        seed = images.sample_seed(self.seed, epoch, index, f"faces:{self.split}")
        generator = torch.Generator().manual_seed(seed)
        limit = float(self.frame_size - self.faces.shape[-1])
        chosen = torch.randint(self.faces.shape[0], (self.num_faces,), generator=generator)  # (K,)
        draw = torch.rand(self.num_faces, 4, generator=generator)  # (K, 4)
        speed = FACE_SPEED[0] + (FACE_SPEED[1] - FACE_SPEED[0]) * draw[:, 2]  # (K,)
        angle = 2 * math.pi * draw[:, 3]  # (K,)
        velocity = torch.stack([angle.cos(), angle.sin()], -1) * (speed * self.speed_scale)[:, None]
        paths = bounce_track(draw[:, :2] * limit, velocity, self.frames, limit)  # (K, T, 2)
        return chosen, paths  # (K,), (K, T, 2)

    def clip(self, index: int, epoch: int = 0) -> torch.Tensor:
        """Clip `index` of `epoch`: float32 (T, 3, F, F)."""
        chosen, paths = self.tracks(index, epoch)
        size = self.frame_size
        canvas = torch.full((self.frames, 1, size, size), self.background)  # (T, 1, F, F)
        for number, path in zip(chosen.tolist(), paths, strict=True):
            layers = _place(self.faces[number], path, size)  # (T, 2, F, F)
            canvas = canvas * (1 - layers[:, 1:]) + layers[:, :1]  # (T, 1, F, F)
        return canvas.expand(-1, 3, -1, -1).clamp(-1.0, 1.0).contiguous()  # (T, 3, F, F)


@functools.cache
def lfw_faces() -> torch.Tensor:
    """The 100 faces of scikit-image's `lfw_subset` as float32 (100, 1, 25, 25) in [-1, 1]."""
    from skimage import data

    return torch.as_tensor(data.lfw_subset()[:100, None], dtype=torch.float32) * 2 - 1


def _synthetic_items(keys: Any, split: str, fractions: tuple[float, float], what: str) -> Any:
    """Positions of the training (train, val) or held-out (test, ood) items among `keys`."""
    parts = ("val", "test") if split in ("test", "ood") else ("train",)
    return sorted(i for p in parts for i in images.split_indices(keys, p, *fractions, what=what))


def _scene(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (3, H, W) scaled to a short side of `side`: float32 (3, h, w) in [-1, 1]."""
    image, scale = images.to_float(pixels)[None], side / min(pixels.shape[1:])  # (1, 3, H, W)
    return F.interpolate(image, scale_factor=scale, mode="bilinear", antialias=True)[0]


def _pan_clips(split: str, fractions: tuple[float, float], **clips: Any) -> PanZoomClips:
    """`PanZoomClips` over the training or held-out photographs."""
    photos = images.SKIMAGE_PHOTOS
    names = [photos[i] for i in _synthetic_items(photos, split, fractions, "photographs")]
    side = SCENE_SCALE * clips["frame_size"]
    scenes = [_scene(images.skimage_photo(name), side) for name in names]
    return PanZoomClips(scenes=scenes, names=names, split=split, **clips)


def _face_clips(split: str, fractions: tuple[float, float], size: int, **clips: Any) -> Any:
    """`BouncingFaces` with the training or held-out faces of `lfw_subset`, `size` wide."""
    faces = lfw_faces()  # (100, 1, 25, 25)
    chosen = _synthetic_items([f"lfw_subset/{i}" for i in range(100)], split, fractions, "faces")
    side = size or clips["frame_size"] // 2
    if not 2 <= side < clips["frame_size"]:
        raise DataError(f"face_size {side} must be at least 2 and below the frame size")
    resized = F.interpolate(faces[chosen], size=(side, side), mode="bilinear", antialias=True)
    return BouncingFaces(faces=resized, split=split, **clips)  # faces (N, 1, s, s)


def build_video_dataset(
    source: str = "pan",
    split: str = "train",
    *,
    frames: int = 8,
    frame_size: int = 32,
    seed: int = 0,
    num_clips: int = 0,
    speed_scale: float = 0.0,
    face_size: int = 0,
    num_faces: int = 1,
    stride: int = 1,
    interval: float = 0.0,
    hop: int = 1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    max_frames: int = 0,
    supersample: int = 1,
    min_speed: float = PAN_SPEED[0],
) -> PanZoomClips | BouncingFaces | VideoClips:
    """Clips of `split` of `source` (see the module docstring) with `len()` and `batch()`.

    Synthetic sources make `num_clips` clips per epoch (0: 1024 for train, 64 otherwise) at
    `speed_scale` (0: 2 for "ood", else 1); pan frames are box-filtered over `supersample` x
    `supersample` samples a pixel (1: one point sample) and pan at `min_speed` to `PAN_SPEED[1]`
    scene px/frame (times the speed scale). Bad sources, files and sizes raise DataError.
    """
    source = source.strip()
    if frames < 2 or frame_size < 0 or hop < 1 or supersample < 1:
        got = (frames, frame_size, hop, supersample)
        raise DataError(f"need frames >= 2, frame_size >= 0, hop >= 1, supersample >= 1: got {got}")
    if not 0 <= min_speed <= PAN_SPEED[1]:
        raise DataError(f"need 0 <= min_speed <= {PAN_SPEED[1]}: got {min_speed}")
    fractions = (val_fraction, test_fraction)
    if source in ("pan", "faces"):
        if split not in SYNTHETIC_SPLITS:
            raise DataError(f"unknown split '{split}': use one of {', '.join(SYNTHETIC_SPLITS)}")
        count = num_clips or (1024 if split == "train" else 64)
        scale = speed_scale or (2.0 if split == "ood" else 1.0)
        clips = {"num_clips": count, "frames": frames, "speed_scale": scale, "seed": seed}
        clips["frame_size"] = frame_size or 32
        if source == "pan":
            motion = {"supersample": supersample, "min_speed": min_speed}
            return _pan_clips(split, fractions, **motion, **clips)
        return _face_clips(split, fractions, face_size, num_faces=num_faces, **clips)
    if source != "skimage-gif" and not any(c in source for c in "/\\,.*?[~"):
        if not os.path.exists(source):
            choices = "pan, faces, skimage-gif, video files or a folder of frames"
            raise DataError(f"unknown video source '{source}': use {choices}")
    read = {"frame_size": frame_size, "stride": stride, "interval": interval}
    videos, names = file_clips(source, split, fractions, max_frames=max_frames, **read)
    return VideoClips(videos, names, frames, hop, source, split)
