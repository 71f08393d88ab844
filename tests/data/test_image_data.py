"""Image data: photographs split by photograph, random / fixed crops, user folders, hf-local."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebt.data.corpus import DataError
from ebt.data.images import (
    SKIMAGE_PHOTOS,
    EpochBatchIterator,
    GridCrops,
    RandomCrops,
    build_image_dataset,
    load_photos,
    split_indices,
    to_rgb,
)
from ebt.data.loader import iter_eval_batches


def _names(split: str) -> list[str]:
    return [SKIMAGE_PHOTOS[i] for i in split_indices(SKIMAGE_PHOTOS, split, 0.15, 0.15, "photos")]


def _write_pngs(folder, sizes) -> None:
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for number, (height, width) in enumerate(sizes):
        iio.imwrite(folder / f"img{number}.png", rng.integers(0, 256, (height, width, 3), np.uint8))


def test_skimage_splits_by_photograph_are_disjoint_nonempty_and_stable():
    splits = {split: _names(split) for split in ("train", "val", "test")}
    assert all(splits.values())
    assert sorted(sum(splits.values(), [])) == sorted(SKIMAGE_PHOTOS)  # disjoint and complete
    assert splits["val"] == ["astronaut", "camera", "retina"]  # the documented assignment
    assert splits["test"] == ["microaneurysms", "motorcycle", "text"]
    assert splits == {split: _names(split) for split in ("train", "val", "test")}


def test_every_skimage_photo_loads_offline_as_rgb_uint8():
    photos = load_photos("skimage", "all")
    assert [photo.name for photo in photos] == list(SKIMAGE_PHOTOS)
    for photo in photos:
        assert photo.pixels.dtype == torch.uint8 and photo.pixels.shape[0] == 3
        assert min(photo.pixels.shape[1:]) >= 100


def test_to_rgb_handles_gray_alpha_float_bool_and_16_bit():
    assert to_rgb(np.zeros((4, 5), np.uint8)).shape == (3, 4, 5)
    assert to_rgb(np.full((4, 5, 4), 7, np.uint8)).unique().tolist() == [7]
    assert to_rgb(np.ones((2, 2), np.float64)).unique().tolist() == [255]
    assert to_rgb(np.ones((2, 2), bool)).unique().tolist() == [255]
    assert to_rgb(np.full((2, 2, 3), 65535, np.uint16)).unique().tolist() == [255]
    with pytest.raises(DataError):
        to_rgb(np.zeros((2, 2, 2, 2), np.uint8))


def test_training_crops_shape_range_and_determinism():
    data = build_image_dataset("skimage", "train", image_size=32, seed=5)
    assert isinstance(data, RandomCrops)
    first = EpochBatchIterator(data, 8, seed=1)
    batches = [next(first) for _ in range(2)]
    assert batches[0].shape == (8, 3, 32, 32) and batches[0].dtype == torch.float32
    assert batches[0].min() >= -1.0 and batches[0].max() <= 1.0
    assert not torch.equal(batches[0], batches[1])
    again = EpochBatchIterator(data, 8, seed=1)
    assert all(torch.equal(batch, next(again)) for batch in batches)
    other = build_image_dataset("skimage", "train", image_size=32, seed=6)
    assert not torch.equal(other.batch(torch.arange(8)), data.batch(torch.arange(8)))
    assert not torch.equal(data.batch(torch.arange(8), 0), data.batch(torch.arange(8), 1))


def test_random_crops_resume_across_epochs(tmp_path):
    _write_pngs(tmp_path / "photos", [(40, 48), (36, 36), (64, 33)])
    data = build_image_dataset(str(tmp_path / "photos"), "all", image_size=16, random_crops=True)
    iterator = EpochBatchIterator(data, 2, seed=3)
    for _ in range(3):
        next(iterator)
    state = iterator.state_dict()
    expected = [next(iterator) for _ in range(8)]  # 9 batches per epoch: crosses into epoch 1
    assert iterator.epoch >= 1
    resumed = EpochBatchIterator(data, 2, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(batch, next(resumed)) for batch in expected)


def test_ranks_get_disjoint_shards():
    data = build_image_dataset("skimage", "train", image_size=32)
    ranks = [EpochBatchIterator(data, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    shards = [set(iterator._indices().tolist()) for iterator in ranks]
    assert shards[0] and not shards[0] & shards[1]
    assert next(ranks[0]).shape == (4, 3, 32, 32)


def test_evaluation_crops_are_fixed():
    first = build_image_dataset("skimage", "val", image_size=32, crops_per_image=16)
    second = build_image_dataset("skimage", "val", image_size=32, crops_per_image=16)
    assert isinstance(first, GridCrops) and len(first) == 3 * 16
    batches = list(iter_eval_batches(first, 10, max_batches=2))
    assert [batch.shape for batch in batches] == [(10, 3, 32, 32)] * 2
    again = list(iter_eval_batches(second, 10, max_batches=2))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert torch.equal(first.batch(torch.arange(5)), first.batch(torch.arange(5), epoch=3))


def test_user_folder_glob_and_list(tmp_path):
    _write_pngs(tmp_path / "a", [(40, 40)] * 6)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    folder = build_image_dataset(str(tmp_path / "a"), "all", image_size=16, random_crops=False)
    assert len(folder.photos) == 6 and folder.batch(torch.arange(3)).shape == (3, 3, 16, 16)
    assert len(load_photos(str(tmp_path / "a" / "*.png"), "all")) == 6
    listed = f"{tmp_path / 'a' / 'img0.png'},{tmp_path / 'a' / 'img1.png'}"
    assert len(load_photos(listed, "all")) == 2
    names = {s: {p.name for p in load_photos(str(tmp_path / "a"), s)} for s in ("train", "val")}
    assert names["train"] and names["val"] and not names["train"] & names["val"]


def test_user_errors_raise_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        load_photos(str(tmp_path / "empty"), "all")
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(DataError, match="cannot read image"):
        load_photos(str(tmp_path / "bad.png"), "all")
    _write_pngs(tmp_path / "small", [(8, 8)])
    with pytest.raises(DataError, match="smaller than"):
        build_image_dataset(str(tmp_path / "small"), "all", image_size=16)
    tiny = build_image_dataset(str(tmp_path / "small"), "all", image_size=8)
    with pytest.raises(DataError, match="make no batch"):
        EpochBatchIterator(tiny, 4, seed=0)
    with pytest.raises(DataError, match="unknown image source"):
        load_photos("coco", "train")
    with pytest.raises(DataError, match="unknown split"):
        load_photos("skimage", "validation")


def test_hf_local_centre_crop_and_resize(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    frames = []
    for shade in range(6):
        pixels = np.zeros((20, 30, 3), np.uint8)  # wide: 5 columns each side are cropped away
        pixels[:, 5:25] = 40 * shade
        frames.append(Image.fromarray(pixels))
    features = datasets.Features({"image": datasets.Image()})
    rows = datasets.Dataset.from_dict({"image": frames}, features=features)
    rows.save_to_disk(str(tmp_path / "ds"))
    data = build_image_dataset(f"hf-local:{tmp_path / 'ds'}", "all", image_size=8)
    assert isinstance(data, GridCrops) and len(data) == 6
    batch = data.batch(torch.arange(6))  # (6, 3, 8, 8): the centre square only
    expected = torch.tensor([40.0 * shade / 127.5 - 1 for shade in range(6)])
    assert torch.allclose(batch.mean(dim=(1, 2, 3)), expected, atol=1e-6)
    train = build_image_dataset(f"hf-local:{tmp_path / 'ds'}", "train", image_size=8)
    assert isinstance(train, RandomCrops)
    assert train.batch(torch.arange(len(train))).shape[1:] == (3, 8, 8)
    with pytest.raises(DataError, match="image field"):
        load_photos(f"hf-local:{tmp_path / 'ds'}", "all", image_field="img")
