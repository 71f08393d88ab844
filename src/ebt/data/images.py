"""Image data for denoising: photographs split by photograph, cut into crops in [-1, 1].

Sources (`source`):

- ``skimage`` (default): the real photographs that ship inside the scikit-image wheel (no
  download; `SKIMAGE_PHOTOS`), grayscale ones as RGB. Left out: drawings and synthetic images,
  `cat` (the same photo as `chelsea`) and the right view of the stereo motorcycle. Photographs
  smaller than the crop are left out.
- local paths / globs / folders, comma-separated: image files (PNG, JPEG, BMP, TIFF, WebP; a
  GIF's first frame), keyed by their path relative to the files' common parent.
- ``hf-local:PATH`` (a `save_to_disk` directory, a folder of images read as `imagefolder`, or
  parquet/arrow/json files) and ``hf:NAME[:CONFIG]`` (its train split): Hugging Face image
  datasets, the image in `image_field`, keyed by row index. Each image is centre-cropped to a
  square and resized to `resize` (default `image_size`), as the paper's COCO at 128 x 128.

Splits ("train", "val", "test", "all") are by photograph: items are ranked by the SHA-1 of their
key (`hash_fraction`); the first round(n * val_fraction) (at least 1) are val, the next
round(n * test_fraction) (at least 1) are test, the rest train. With the defaults (0.15 / 0.15)
the scikit-image photographs split 13 / 3 / 3: val retina, camera, astronaut; test
microaneurysms, text, motorcycle.

Training crops (`RandomCrops`): example k of epoch e is a crop of `image_size` at a random place,
flipped horizontally with probability 1/2, drawn from a generator seeded by (seed, e, k) alone,
so an iterator resumes exactly from its `state_dict`; a photograph gives max(1, (H // S) *
(W // S)) examples per epoch. Evaluation crops (`GridCrops`): the centred grid of S x S tiles of
each photograph, at most `crops_per_image` of them evenly spaced, the same on every run.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ebt.data.corpus import expand_paths, open_hf_dataset
from ebt.data.loader import BatchIterator
from ebt.data.splits import hash_fraction
from ebt.errors import DataError

SKIMAGE_PHOTOS = tuple(
    "astronaut brick camera cell chelsea clock coffee coins grass gravel hubble_deep_field "
    "immunohistochemistry microaneurysms moon motorcycle page retina rocket text".split()
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
IMAGE_SPLITS = ("train", "val", "test", "all")


@dataclass(frozen=True)
class Photo:
    """One photograph: its key and its pixels."""

    name: str
    pixels: torch.Tensor  # (3, H, W) uint8


def to_rgb(array: Any, name: str = "image") -> torch.Tensor:
    """A (H, W), (H, W, 1..4) array of any pixel type as an RGB uint8 tensor (3, H, W).

    Floats are read as [0, 1], 16-bit as 0..65535; alpha is dropped; gray is repeated.
    """
    data = np.asarray(array)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8) * 255
    elif np.issubdtype(data.dtype, np.floating):
        data = np.round(np.clip(data, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif data.dtype == np.uint16:
        data = (data >> 8).astype(np.uint8)
    elif data.dtype != np.uint8:
        data = np.clip(data, 0, 255).astype(np.uint8)
    if data.ndim == 3 and data.shape[-1] in (1, 2):
        data = data[..., 0]
    if data.ndim == 2:
        data = np.repeat(data[..., None], 3, axis=-1)  # (H, W, 3)
    if data.ndim != 3 or data.shape[-1] not in (3, 4) or min(data.shape[:2]) < 1:
        raise DataError(f"'{name}' is not a 2-D image (array of shape {tuple(data.shape)})")
    rgb = np.array(data[..., :3], order="C")  # (H, W, 3), a writable copy
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # (3, H, W)


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) as float32 in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0  # (..., 3, H, W)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (..., 3, H, W) (any shape) as uint8 pixels 0-255, the same shape (the
    inverse of `to_float`, up to rounding)."""
    return ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def square_resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The centred square of `pixels` (C, H, W) resized to (C, size, size), antialiased, uint8."""
    _, height, width = pixels.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = pixels[:, top : top + side, left : left + side]  # (C, side, side)
    if side == size:
        return square.contiguous()
    resized = F.interpolate(
        square[None].float(), size=(size, size), mode="bilinear", antialias=True
    )  # (1, C, size, size)
    return resized[0].round().clamp(0, 255).to(torch.uint8)  # (C, size, size)


def split_indices(
    keys: Sequence[str], split: str, val_fraction: float, test_fraction: float, what: str
) -> list[int]:
    """Positions of `keys` in `split`, ranked by stable hash (see the module docstring)."""
    if split not in IMAGE_SPLITS:
        raise DataError(f"unknown split '{split}': use one of {', '.join(IMAGE_SPLITS)}")
    if split == "all":
        return list(range(len(keys)))
    n = len(keys)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n_val + n_test >= n:
        raise DataError(
            f"{n} {what} cannot be split into train / val / test at val_fraction="
            f"{val_fraction}, test_fraction={test_fraction}; add data or use split 'all'"
        )
    ranked = sorted(range(n), key=lambda i: (hash_fraction(keys[i]), keys[i]))
    bounds = {"val": (0, n_val), "test": (n_val, n_val + n_test), "train": (n_val + n_test, n)}
    start, stop = bounds[split]
    return sorted(ranked[start:stop])


@functools.cache
def skimage_photo(name: str) -> torch.Tensor:
    """One of `SKIMAGE_PHOTOS` as RGB uint8 (3, H, W), loaded from the wheel (cached)."""
    if name not in SKIMAGE_PHOTOS:
        raise DataError(f"unknown scikit-image photograph '{name}'")
    from skimage import data

    array = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return to_rgb(array, name)


def read_image(path: str | Path) -> torch.Tensor:
    """An image file (the first frame) as RGB uint8 (3, H, W); bad files raise DataError."""
    import imageio.v3 as iio

    plugin = None if Path(path).suffix.lower() in (".tif", ".tiff") else "pillow"  # tifffile
    try:
        array = iio.imread(path, index=0, plugin=plugin)
    except Exception as error:  # imageio raises many types for bad files
        raise DataError(f"cannot read image '{path}': {str(error).splitlines()[0]}") from None
    return to_rgb(array, str(path))


def _local_photos(spec: str, split: str, fractions: tuple[float, float]) -> list[Photo]:
    """Image files named by `spec` (paths, globs, folders) in `split`."""
    files = [path for path in expand_paths(spec) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in '{spec}'")
    root = Path(os.path.commonpath([str(path.parent) for path in files]))
    keys = [path.relative_to(root).as_posix() for path in files]
    chosen = split_indices(keys, split, *fractions, what="images")
    return [Photo(keys[i], read_image(files[i])) for i in chosen]


def _hf_image(value: Any, name: str) -> torch.Tensor:
    """A dataset cell (PIL image, {"bytes"/"path"} dict, or array) as RGB uint8 (3, H, W)."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        import imageio.v3 as iio

        return to_rgb(iio.imread(value.get("bytes") or value["path"], index=0), name)
    if hasattr(value, "convert"):  # PIL.Image.Image
        return to_rgb(np.asarray(value.convert("RGB")), name)
    return to_rgb(value, name)


def _hf_photos(
    source: str, split: str, fractions: tuple[float, float], field: str, max_images: int
) -> list[Photo]:
    """Images of a Hugging Face dataset in `split` (the first `max_images` rows; 0 = all)."""
    rows = open_hf_dataset(source, streaming=False, folder_as_images=True)
    if field not in rows.column_names:
        fields = ", ".join(sorted(rows.column_names))
        raise DataError(f"image field '{field}' not in the dataset; fields: {fields}")
    keys = [str(index) for index in range(len(rows))]
    chosen = split_indices(keys, split, *fractions, what="images")
    chosen = chosen[:max_images] if max_images else chosen
    return [Photo(f"{source}#{i}", _hf_image(rows[i][field], f"{source}#{i}")) for i in chosen]


def load_photos(
    source: str = "skimage",
    split: str = "train",
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    image_field: str = "image",
    max_images: int = 0,
) -> list[Photo]:
    """The photographs of `split` of `source`, as RGB uint8 (see the module docstring).

    `max_images` (0 = all) keeps the first images of the split, after splitting.

    Unknown sources, paths that match nothing, folders without images, unreadable files and
    empty splits raise DataError.
    """
    source = source.strip()
    fractions = (val_fraction, test_fraction)
    if source == "skimage":
        chosen = split_indices(SKIMAGE_PHOTOS, split, *fractions, what="photographs")
        photos = [Photo(SKIMAGE_PHOTOS[i], skimage_photo(SKIMAGE_PHOTOS[i])) for i in chosen]
    elif source.startswith(("hf:", "hf-local:")):
        photos = _hf_photos(source, split, fractions, image_field, max_images)
    elif any(char in source for char in "/\\,.*?[~") or os.path.exists(source):
        photos = _local_photos(source, split, fractions)
    else:
        raise DataError(
            f"unknown image source '{source}': use skimage, a path/glob[,path...], "
            "hf:NAME[:CONFIG] or hf-local:PATH"
        )
    if max_images:
        photos = photos[:max_images]
    if not photos:
        raise DataError(f"no {split} images in source '{source}'")
    return photos


def sample_seed(seed: int, epoch: int, index: int, salt: str = "") -> int:
    """A 63-bit generator seed from (salt, seed, epoch, index), stable everywhere."""
    digest = hashlib.sha1(f"{salt}:{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class RandomCrops:
    """Training crops: a pure function of (seed, epoch, index); see the module docstring."""

    photos: list[Photo]
    image_size: int
    seed: int = 0
    flip: bool = True
    source: str = "skimage"
    split: str = "train"

    def __post_init__(self) -> None:
        _check_sizes(self.photos, self.image_size)
        size = self.image_size
        counts = [
            max(1, (p.pixels.shape[1] // size) * (p.pixels.shape[2] // size)) for p in self.photos
        ]
        self._ends = torch.tensor(counts).cumsum(0)  # (P,)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def crop(self, index: int, epoch: int = 0) -> torch.Tensor:
        """Example `index` of `epoch`: float32 (3, S, S) in [-1, 1]."""
        photo = self.photos[int(torch.searchsorted(self._ends, index, right=True))]
        size, (_, height, width) = self.image_size, photo.pixels.shape
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index, "crop"))
        top = int(torch.randint(height - size + 1, (1,), generator=generator))
        left = int(torch.randint(width - size + 1, (1,), generator=generator))
        flipped = bool(torch.rand((), generator=generator) < 0.5) and self.flip
        pixels = photo.pixels[:, top : top + size, left : left + size]  # (3, S, S)
        return to_float(pixels.flip(-1) if flipped else pixels)  # (3, S, S)

    def batch(self, indices: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """Examples `indices` of `epoch` as float32 (B, 3, S, S)."""
        return torch.stack([self.crop(int(i), epoch) for i in indices])  # (B, 3, S, S)


@dataclass
class GridCrops:
    """Evaluation crops: fixed tiles of each photograph; see the module docstring."""

    photos: list[Photo]
    image_size: int
    crops_per_image: int = 64
    source: str = "skimage"
    split: str = "val"

    def __post_init__(self) -> None:
        _check_sizes(self.photos, self.image_size)
        self.tiles: list[tuple[int, int, int]] = []  # (photo, top, left)
        for number, photo in enumerate(self.photos):
            corners = _grid(photo.pixels.shape[1:], self.image_size, self.crops_per_image)
            self.tiles.extend((number, top, left) for top, left in corners)

    def __len__(self) -> int:
        return len(self.tiles)

    def batch(self, indices: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """Tiles `indices` as float32 (B, 3, S, S); `epoch` is ignored."""
        size, crops = self.image_size, []
        for index in indices:
            number, top, left = self.tiles[int(index)]
            crops.append(self.photos[number].pixels[:, top : top + size, left : left + size])
        return to_float(torch.stack(crops))  # (B, 3, S, S)


def _grid(shape: Sequence[int], size: int, limit: int) -> list[tuple[int, int]]:
    """Top-left corners of the centred grid of size x size tiles, at most `limit` evenly spaced."""
    rows, cols = shape[0] // size, shape[1] // size
    top0, left0 = (shape[0] - rows * size) // 2, (shape[1] - cols * size) // 2
    corners = [(top0 + r * size, left0 + c * size) for r in range(rows) for c in range(cols)]
    if limit and len(corners) > limit:
        corners = [corners[i * len(corners) // limit] for i in range(limit)]
    return corners


def _check_sizes(photos: list[Photo], size: int) -> None:
    """Every photograph must hold one crop of `size`."""
    for photo in photos:
        height, width = photo.pixels.shape[1:]
        if min(height, width) < size:
            raise DataError(
                f"image '{photo.name}' is {width}x{height}, smaller than the {size}x{size} crop; "
                "lower data.image_size or remove it"
            )


def build_image_dataset(
    source: str = "skimage",
    split: str = "train",
    *,
    image_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    resize: int = 0,
    image_field: str = "image",
    max_images: int = 0,
    crops_per_image: int = 64,
    random_crops: bool | None = None,
) -> RandomCrops | GridCrops:
    """Crops of `split` of `source`: random (training, the default for "train") or fixed.

    `resize` > 0 centre-crops every image to a square of that side first (Hugging Face sources
    default to `image_size`). Returns a dataset with `len()` and `batch(indices, epoch)`.
    """
    if image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    fractions = {"val_fraction": val_fraction, "test_fraction": test_fraction}
    photos = load_photos(source, split, image_field=image_field, max_images=max_images, **fractions)
    side = resize or (image_size if source.strip().startswith(("hf:", "hf-local:")) else 0)
    if side:
        photos = [Photo(p.name, square_resize(p.pixels, side)) for p in photos]
    if source.strip() == "skimage":
        photos = [p for p in photos if min(p.pixels.shape[1:]) >= image_size] or photos
    train_mode = split == "train" if random_crops is None else random_crops
    if train_mode:
        return RandomCrops(photos, image_size, seed=seed, source=source, split=split)
    return GridCrops(
        photos, image_size, crops_per_image=crops_per_image, source=source, split=split
    )


class EpochBatchIterator(BatchIterator):
    """`BatchIterator` for datasets whose examples depend on the epoch (random crops, clips).

    Same sharding, order and `state_dict` as the text iterator; each batch is
    `dataset.batch(indices, epoch)`, so resuming from a state continues identically.
    """

    def __init__(self, dataset: Any, batch_size: int, **kwargs: Any) -> None:
        world_size, drop_last = kwargs.get("world_size", 1), kwargs.get("drop_last", True)
        unit = batch_size * world_size if drop_last else world_size
        if len(dataset) < unit:
            raise DataError(
                f"{len(dataset)} examples in source '{dataset.source}' split '{dataset.split}' "
                f"make no batch of {batch_size} on {world_size} rank(s); lower the batch size "
                "or add data"
            )
        super().__init__(dataset, batch_size, **kwargs)

    def __next__(self) -> torch.Tensor:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        indices = self._indices()[start : start + self.batch_size]  # (B,)
        self.position += 1
        return self.dataset.batch(indices, self.epoch)  # (B, ...)
