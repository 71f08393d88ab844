"""Denoising a photograph of any size with a model trained on small crops.

The photograph is cut into overlapping tiles of the model's image size (stride half a tile by
default; where the size is not a multiple of the stride, the last tile of a row or column is
shifted inward to end at the border; an image smaller than a tile is padded by reflection up to
one and cropped back). Every tile is denoised, and each pixel is the weighted mean of the tiles
covering it, weights from a separable sin^2 (Hann) window that is small but positive at a tile's
edges: the summed weights normalise, so the blend is exact (a denoiser that returns its input
gives back the photograph) and the seams of neighbouring tiles fade into each other.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm import tqdm

from ebt.api import LoadedRun
from ebt.config import ConfigError
from ebt.data.corpus import DataError
from ebt.data.images import read_image, to_float, to_uint8
from ebt.modalities.image.denoise import (
    DenoiseOptions,
    Denoiser,
    check_levels,
    make_denoiser,
    run_diffusion,
)
from ebt.modalities.image.diffusion import GaussianDiffusion
from ebt.modalities.image.task import psnr
from ebt.outputs import atomic_path


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Offsets of the tiles along a side of `length` >= tile: every `stride`, the last one moved
    inward so that it ends at the border."""
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_window(tile: int) -> torch.Tensor:
    """The (tile, tile) float64 blend weight: sin^2(pi (i + 1/2) / tile) per axis, outer product
    (positive everywhere, 1 near the centre)."""
    ramp = torch.sin(math.pi * (torch.arange(tile, dtype=torch.float64) + 0.5) / tile) ** 2
    return ramp[:, None] * ramp[None, :]  # (tile, tile)


def tile_corners(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """(top, left) of every tile of a (height, width) image, rows first."""
    rows, columns = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    return [(top, left) for top in rows for left in columns]


def tile_weights(height: int, width: int, tile: int, stride: int) -> torch.Tensor:
    """The summed blend weights (height, width) of every tile: what `denoise_tiled` divides by."""
    total = torch.zeros(height, width, dtype=torch.float64)
    window = blend_window(tile)  # (tile, tile)
    for top, left in tile_corners(height, width, tile, stride):
        total[top : top + tile, left : left + tile] += window
    return total


def _pad_to(image: torch.Tensor, tile: int) -> torch.Tensor:
    """An image (C, H, W) padded at the bottom / right to at least (tile, tile): by reflection
    where the image is big enough for it, else by repeating its edge."""
    bottom, right = max(0, tile - image.shape[1]), max(0, tile - image.shape[2])
    if not bottom and not right:
        return image
    mode = "reflect" if bottom < image.shape[1] and right < image.shape[2] else "replicate"
    return F.pad(image[None], (0, right, 0, bottom), mode=mode)[0]  # (C, H', W')


def denoise_tiled(
    image: torch.Tensor,
    denoise: Denoiser,
    tile: int,
    stride: int,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[torch.Tensor, float, int]:
    """Denoise an image (C, H, W) tile by tile (see the module docstring). Returns (the image
    (C, H, W), energy evaluations per tile (mean), tiles)."""
    height, width = image.shape[1:]
    padded = _pad_to(image, tile)  # (C, H', W')
    corners = tile_corners(padded.shape[1], padded.shape[2], tile, stride)
    window = blend_window(tile)  # (tile, tile)
    total = torch.zeros(padded.shape, dtype=torch.float64)  # (C, H', W')
    weights = torch.zeros(padded.shape[1:], dtype=torch.float64)  # (H', W')
    passes = 0.0
    bar = tqdm(
        total=len(corners),
        desc="tiles",
        unit="tile",
        file=sys.stderr,
        delay=2,
        disable=not progress,
    )  # counts tiles, not batches
    for start in range(0, len(corners), batch_size):
        chunk = corners[start : start + batch_size]
        tiles = torch.stack([padded[:, t : t + tile, c : c + tile] for t, c in chunk])
        verdict = denoise(tiles)  # images (n, C, tile, tile)
        passes += (verdict.forward_passes or 0.0) * len(chunk)
        for (top, left), out in zip(chunk, verdict.images.detach().cpu(), strict=True):
            total[:, top : top + tile, left : left + tile] += out.double() * window
            weights[top : top + tile, left : left + tile] += window
        bar.update(len(chunk))
    bar.close()
    blended = (total / weights).to(image.dtype)  # (C, H', W')
    return blended[:, :height, :width], passes / len(corners), len(corners)


def add_noise(
    clean: torch.Tensor, diffusion: GaussianDiffusion, level: float, seed: int
) -> torch.Tensor:
    """The paper's noise at `level` on an image (C, H, W) in [-1, 1], from a seeded generator."""
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))  # (C, H, W)
    t = torch.tensor([diffusion.timestep_for_level(level)])  # (1,)
    return diffusion.q_sample(clean[None], t, noise[None].to(clean.device))[0]  # (C, H, W)


def denoise_photo(
    path: str | Path,
    output: str | Path,
    denoise: Denoiser,
    tile: int,
    patch: int,
    stride: int = 0,
    noise: tuple[GaussianDiffusion, float, int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Denoise the image file `path` (grayscale and RGBA read as RGB) into `output` (PNG, or
    any format the suffix names). `noise` = (diffusion, level, seed) first adds the paper's
    noise at that level and reports the PSNR before and after. Stride 0: half a tile."""
    clean = to_float(read_image(path))  # (3, H, W) in [-1, 1]
    height, width = clean.shape[1:]
    if min(height, width) < patch:
        raise DataError(f"'{path}' is {width}x{height}, smaller than one {patch}x{patch} patch")
    started = time.perf_counter()
    noisy = clean if noise is None else add_noise(clean, *noise)  # (3, H, W)
    stride = stride or max(1, tile // 2)
    restored, per_tile, tiles = denoise_tiled(noisy, denoise, tile, stride, progress=progress)
    pixels = to_uint8(restored).permute(1, 2, 0)  # (H, W, 3)
    seconds = time.perf_counter() - started
    import imageio.v3 as iio

    with atomic_path(output) as temporary:  # never a half-written photograph
        iio.imwrite(temporary, pixels.numpy())
    result = {"input": str(path), "output": str(output), "height": height, "width": width}
    result |= {"tile": tile, "stride": stride, "tiles": tiles, "seconds": seconds}
    result |= {"forward_passes_per_tile": per_tile, "forward_passes": per_tile * tiles}
    if noise is not None:
        written = to_float(pixels.permute(2, 0, 1))[None]  # (1, 3, H, W): what was written
        before, after = float(psnr(noisy[None], clean[None])), float(psnr(written, clean[None]))
        result |= {"noise_level": noise[1], "psnr_noisy": before, "psnr_denoised": after}
        result["psnr_gain"] = after - before
    return result


@dataclass(frozen=True)
class PhotoRequest:
    """`ebt denoise --input`: the photograph, where the result goes, and how to denoise it.
    `level`: the noise level the denoiser assumes when nothing is added (None: the run's
    data.noise_level); `add_noise`: first add the paper's noise at this level."""

    input: str
    output: str
    add_noise: float | None = None
    level: float | None = None
    tile_stride: int | None = None
    steps: int | None = None
    samples: int = 1


def photo_command(
    run: LoadedRun, request: PhotoRequest, options: DenoiseOptions, seed: int
) -> dict[str, Any]:
    """`ebt denoise RUN --input P --output Q [--add-noise L]`: the run's denoiser (EBT thinking
    with the request's steps, samples and knobs; DiT: DDIM from add_noise's level, else
    `level`, else data.noise_level) applied tile by tile."""
    diffusion, data = run_diffusion(run), run.config.data
    level = request.add_noise or request.level or data.noise_level
    check_levels(diffusion, [level])
    tile, patch = data.image_size, run.model.patch_size
    if request.tile_stride and request.tile_stride > tile:
        raise ConfigError(f"--tile-stride {request.tile_stride}: at most the tile ({tile})")
    timestep = diffusion.timestep_for_level(level)
    denoise = make_denoiser(run.model, diffusion, timestep, request.steps, request.samples, options)
    noise = (diffusion, request.add_noise, seed) if request.add_noise else None
    stride = request.tile_stride or 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result = denoise_photo(request.input, request.output, denoise, tile, patch, stride, noise)
    return result | {"checkpoint": str(run.checkpoint), "seed": seed}


def photo_summary(result: dict[str, Any]) -> str:
    """One line for a person: what was written, how long it took, and the PSNR gain."""
    line = (
        f"{result['output']}: {result['width']}x{result['height']}, {result['tiles']} tiles, "
        f"{result['forward_passes_per_tile']:g} forward pass(es) per tile, "
        f"{result['seconds']:.1f} s"
    )
    if "psnr_gain" in result:
        line += (
            f"; PSNR {result['psnr_noisy']:.2f} dB (noisy, level {result['noise_level']:g}) -> "
            f"{result['psnr_denoised']:.2f} dB ({result['psnr_gain']:+.2f} dB)"
        )
    return line
