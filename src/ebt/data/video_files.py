"""Video files and folders of frames as clips: reading (GIF through Pillow; MP4, AVI, MOV, WebM,
MKV through imageio-ffmpeg; folders of stills in natural name order), sampling every `stride`-th
frame or one per `interval` seconds, centre-cropping and resizing, and the train | val | test
split of one video in time or of several by path. `ebt.data.video.build_video_dataset` is the
entry point; its docstring describes every source.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import torch

from ebt.data import images
from ebt.data.corpus import DataError, expand_paths

VIDEO_SUFFIXES = frozenset({".gif", ".mp4", ".avi", ".mov", ".webm", ".mkv", ".m4v"})
SKIMAGE_GIF = "no_time_for_that_tiny.gif"


class ClipSet:
    """The shared `batch` of the clip datasets (each defines `clip(index, epoch)`)."""

    def batch(self, indices: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """Clips `indices` of `epoch` as float32 (B, T, 3, F, F)."""
        return torch.stack([self.clip(int(i), epoch) for i in indices])  # (B, T, 3, F, F)


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _stride(stride: int, interval: float, meta: dict[str, Any], name: str) -> int:
    """Frames between samples: `stride`, or `interval` seconds at the frame rate in `meta`."""
    if interval <= 0:
        if stride < 1:
            raise DataError(f"stride must be at least 1, got {stride}")
        return stride
    gif = name.lower().endswith(".gif") and meta.get("duration")  # GIF: milliseconds per frame
    fps = float(meta.get("fps") or (1000.0 / float(meta["duration"]) if gif else 0.0))
    if fps <= 0:
        raise DataError(f"'{name}' has no frame rate for interval={interval}; give a stride")
    return max(1, round(interval * fps))


def _still_files(files: list[Path], name: str) -> list[Path]:
    """The still images (not GIFs) among `files`, in natural name order."""
    stills = [p for p in files if p.suffix.lower() in images.IMAGE_SUFFIXES - VIDEO_SUFFIXES]
    if not stills:
        raise DataError(f"no video files or frames (still images) in '{name}'")
    return sorted(stills, key=_natural_key)


def read_video(
    path: str | Path | list[Path],
    *,
    frame_size: int = 32,
    stride: int = 1,
    interval: float = 0.0,
    max_frames: int = 0,
) -> torch.Tensor:
    """A video file, a folder of frames or a list of frame files as uint8 (N, 3, F, F).

    Every `stride`-th frame (or one every `interval` seconds), at most `max_frames` (0 = all),
    centre-cropped and resized to `frame_size` (0 = as they are). Bad files raise DataError.
    """
    name = f"{path[0].parent}" if isinstance(path, list) else str(path)
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(path, list) or Path(path).is_dir():
                files = path if isinstance(path, list) else _still_files(expand_paths(name), name)
                step = _stride(stride, interval, {}, name)
                frames: Any = (images.read_image(f) for f in files[::step])
            else:
                plugin = "pillow" if name.lower().endswith(".gif") else None  # else ffmpeg
                reader = stack.enter_context(iio.imopen(path, "r", plugin=plugin))
                step = _stride(stride, interval, reader.metadata(), name)
                arrays = itertools.islice(reader.iter(), 0, None, step)
                frames = (images.to_rgb(array, name) for array in arrays)
            sized = (images.square_resize(f, frame_size) if frame_size else f for f in frames)
            kept = list(itertools.islice(sized, max_frames or None))  # N x (3, F, F)
        if not kept:
            raise DataError(f"video '{name}' has no frames")
        return torch.stack(kept)  # (N, 3, F, F)
    except DataError:
        raise
    except Exception as error:  # imageio and its plugins raise many types for bad files
        raise DataError(f"cannot read video '{name}': {str(error).splitlines()[0]}") from None


@dataclass
class VideoClips(ClipSet):
    """Clips of `frames` consecutive sampled frames of videos, one every `hop` frames."""

    videos: list[torch.Tensor]  # each (N_i, 3, F, F) uint8
    names: list[str]
    frames: int = 8
    hop: int = 1
    source: str = ""
    split: str = "all"

    def __post_init__(self) -> None:
        self.starts: list[tuple[int, int]] = []  # (video, first frame)
        for number, (video, name) in enumerate(zip(self.videos, self.names, strict=True)):
            if video.shape[0] < self.frames:
                count = f"{video.shape[0]} sampled frames ({self.split} split)"
                raise DataError(f"video '{name}' has {count}, fewer than a clip's {self.frames}")
            last = video.shape[0] - self.frames
            self.starts.extend((number, first) for first in range(0, last + 1, self.hop))

    def __len__(self) -> int:
        return len(self.starts)

    def clip(self, index: int, epoch: int = 0) -> torch.Tensor:
        """Clip `index`: float32 (T, 3, F, F); `epoch` is ignored."""
        number, first = self.starts[index]
        return images.to_float(self.videos[number][first : first + self.frames])  # (T, 3, F, F)


def _time_split(video: torch.Tensor, split: str, fractions: tuple[float, float]) -> torch.Tensor:
    """The train | val | test part of one video (N, ...) in time, or all of it."""
    n = video.shape[0]
    n_val, n_test = round(n * fractions[0]), round(n * fractions[1])
    cut = n - n_val - n_test
    bounds = {"all": (0, n), "train": (0, cut), "val": (cut, n - n_test), "test": (n - n_test, n)}
    if split not in bounds:
        raise DataError(f"unknown split '{split}' for a video file: use {', '.join(bounds)}")
    start, stop = bounds[split]
    return video[start:stop]


def file_clips(source: str, split: str, fractions: tuple[float, float], **read: Any) -> Any:
    """(videos (N_i, 3, F, F) uint8, names) of `split` of a file / folder / glob source."""
    if source == "skimage-gif":
        from skimage import data

        source = str(Path(data.data_dir) / SKIMAGE_GIF)
    files = expand_paths(source)
    items: list[Any] = [f for f in files if f.suffix.lower() in VIDEO_SUFFIXES]
    items = items or [_still_files(files, source)]
    names = [str(item[0].parent if isinstance(item, list) else item) for item in items]
    if len(items) > 1:  # split by path relative to the videos' common folder
        root = os.path.commonpath([os.path.dirname(name) for name in names])
        names = [Path(name).relative_to(root).as_posix() for name in names]
        chosen = images.split_indices(names, split, *fractions, what="videos")
        items, names = [items[i] for i in chosen], [names[i] for i in chosen]
        return [read_video(item, **read) for item in items], names
    return [_time_split(read_video(items[0], **read), split, fractions)], names
