"""Video data: pan/zoom and bouncing-face clips (deterministic per seed), GIFs and frame folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebt.config import load_config
from ebt.data.corpus import DataError
from ebt.data.images import SKIMAGE_PHOTOS, EpochBatchIterator, split_indices
from ebt.data.video import (
    FACE_SPEED,
    PAN_SPEED,
    PAN_ZOOM,
    BouncingFaces,
    PanZoomClips,
    bounce_track,
    build_video_dataset,
)
from ebt.data.video_files import VideoClips, read_video
from ebt.modalities.video.task import VideoModality


def _write_gif(path, count: int) -> None:
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.zeros((count, 12, 12, 3), np.uint8)
    for number in range(count):
        frames[number] = 20 * number  # frame k is uniformly 20 k
    iio.imwrite(path, frames, duration=100, loop=0)


def test_pan_clips_are_deterministic_per_seed():
    first = build_video_dataset("pan", "train", seed=3, num_clips=8)
    assert isinstance(first, PanZoomClips) and len(first) == 8
    batch = first.batch(torch.arange(4))
    assert batch.shape == (4, 8, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    assert torch.equal(batch, build_video_dataset("pan", "train", seed=3).batch(torch.arange(4)))
    assert not torch.equal(
        batch, build_video_dataset("pan", "train", seed=4).batch(torch.arange(4))
    )
    assert not torch.equal(batch, first.batch(torch.arange(4), epoch=1))  # fresh clips per epoch
    assert not torch.equal(batch[:, 0], batch[:, -1])  # the camera moves


def test_pan_ood_uses_held_out_photos_at_twice_the_speed():
    train = build_video_dataset("pan", "train", num_clips=64)
    ood = build_video_dataset("pan", "ood", num_clips=64)
    held = split_indices(SKIMAGE_PHOTOS, "val", 0.15, 0.15, "p")
    held += split_indices(SKIMAGE_PHOTOS, "test", 0.15, 0.15, "p")
    assert sorted(ood.names) == sorted(SKIMAGE_PHOTOS[i] for i in held)
    assert not set(ood.names) & set(train.names)
    assert build_video_dataset("pan", "val").names == train.names  # in distribution
    moves = {name: [d.motion(i) for i in range(64)] for name, d in (("train", train), ("ood", ood))}
    assert all(PAN_SPEED[0] <= m.speed <= PAN_SPEED[1] for m in moves["train"])
    assert all(2 * PAN_SPEED[0] <= m.speed <= 2 * PAN_SPEED[1] for m in moves["ood"])
    assert any(m.speed > PAN_SPEED[1] for m in moves["ood"])
    assert all(abs(m.zoom_rate) <= 2 * PAN_ZOOM for m in moves["ood"])
    assert ood.clip(0).shape == (8, 3, 32, 32)


def test_bounce_track_reflects_at_the_walls():
    track = bounce_track(torch.tensor([0.0, 5.0]), torch.tensor([3.0, -2.0]), 6, 5.0)
    assert track[:, 0].tolist() == [0.0, 3.0, 4.0, 1.0, 2.0, 5.0]
    assert track[:, 1].tolist() == [5.0, 3.0, 1.0, 1.0, 3.0, 5.0]


def test_bouncing_faces_are_deterministic_and_stay_inside():
    faces = build_video_dataset("faces", "train", seed=1, num_faces=2, speed_scale=4.0)
    assert isinstance(faces, BouncingFaces)
    clip = faces.clip(0)  # (T, 3, F, F)
    assert clip.shape == (8, 3, 32, 32) and torch.equal(clip, faces.clip(0))
    other = build_video_dataset("faces", "train", seed=2, num_faces=2, speed_scale=4.0)
    assert not torch.equal(clip, other.clip(0))
    limit = 32 - faces.faces.shape[-1]
    for index in range(16):
        _, paths = faces.tracks(index)  # (K, T, 2)
        assert paths.min() >= 0.0 and paths.max() <= limit
    single = build_video_dataset("faces", "train", num_faces=1, speed_scale=4.0, frames=12)
    bounced = 0
    for index in range(8):
        ink = (single.clip(index)[:, 0] + 1.0).sum(dim=(1, 2))  # (T,): face mass over background
        assert torch.allclose(ink, ink[0].expand_as(ink), rtol=1e-4)  # never clipped by an edge
        steps = single.tracks(index)[1][0].diff(dim=0)  # (T-1, 2)
        bounced += int((steps[1:] * steps[:-1] < 0).any())
    assert bounced > 0


def test_faces_ood_uses_held_out_faces_at_twice_the_speed():
    train = build_video_dataset("faces", "train")
    ood = build_video_dataset("faces", "ood")
    assert train.faces.shape[0] + ood.faces.shape[0] == 100
    assert ood.speed_scale == 2.0 and train.speed_scale == 1.0
    first = ood.tracks(0)[1][0]  # (T, 2)
    assert first.diff(dim=0).norm(dim=-1).max() <= 2 * FACE_SPEED[1] + 1e-5


def test_synthetic_batches_resume_exactly():
    data = build_video_dataset("faces", "train", num_clips=12)
    iterator = EpochBatchIterator(data, 4, seed=0)
    next(iterator)
    state = iterator.state_dict()
    expected = [next(iterator) for _ in range(4)]  # crosses into epoch 1
    resumed = EpochBatchIterator(data, 4, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(batch, next(resumed)) for batch in expected)


def test_skimage_gif_at_a_stride():
    assert read_video(build_video_dataset("skimage-gif", "all").names[0]).shape == (24, 3, 32, 32)
    clips = build_video_dataset("skimage-gif", "all", stride=3, frames=4)
    assert isinstance(clips, VideoClips) and clips.videos[0].shape[0] == 8 and len(clips) == 5
    paper = build_video_dataset("skimage-gif", "all", interval=0.25, frames=4)  # 70 ms frames
    assert paper.videos[0].shape[0] == 6  # every 4th frame
    assert clips.batch(torch.arange(2)).shape == (2, 4, 3, 32, 32)


def test_gif_file_stride_and_time_split(tmp_path):
    _write_gif(tmp_path / "clip.gif", 10)
    frames = read_video(tmp_path / "clip.gif", frame_size=8, stride=3)  # frames 0, 3, 6, 9
    assert frames.shape == (4, 3, 8, 8)
    assert frames[:, 0, 0, 0].tolist() == [0, 60, 120, 180]
    assert read_video(tmp_path / "clip.gif", interval=0.2, frame_size=0).shape == (5, 3, 12, 12)
    parts = {
        split: build_video_dataset(str(tmp_path / "clip.gif"), split, frames=2, frame_size=8)
        for split in ("train", "val", "test")
    }
    firsts = [set(part.videos[0][:, 0, 0, 0].tolist()) for part in parts.values()]
    assert all(firsts) and not (firsts[0] & firsts[1] or firsts[1] & firsts[2])


def test_folder_of_frames_in_natural_order(tmp_path):
    import imageio.v3 as iio

    for number in range(12):
        iio.imwrite(tmp_path / f"f{number}.png", np.full((10, 14, 3), 10 * number, np.uint8))
    clips = build_video_dataset(str(tmp_path), "all", frames=3, frame_size=8, stride=2)
    assert clips.videos[0][:, 0, 0, 0].tolist() == [0, 20, 40, 60, 80, 100]
    assert len(clips) == 4 and clips.clip(0).shape == (3, 3, 8, 8)


def test_video_errors_raise_data_error(tmp_path):
    (tmp_path / "bad.gif").write_text("not a video")
    with pytest.raises(DataError, match="cannot read video"):
        build_video_dataset(str(tmp_path / "bad.gif"), "all")
    _write_gif(tmp_path / "short.gif", 4)
    with pytest.raises(DataError, match="fewer than a clip"):
        build_video_dataset(str(tmp_path / "short.gif"), "all", frames=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        build_video_dataset(str(tmp_path / "empty"), "all")
    with pytest.raises(DataError, match="unknown video source"):
        build_video_dataset("bouncing", "train")
    with pytest.raises(DataError, match="unknown split"):
        build_video_dataset("pan", "all")


def test_several_videos_split_by_file(tmp_path):
    for number in range(7):
        _write_gif(tmp_path / "videos" / f"v{number}.gif", 3)
    source = str(tmp_path / "videos")
    every = build_video_dataset(source, "all", frames=2, frame_size=8)
    assert sorted(every.names) == [f"v{number}.gif" for number in range(7)]
    parts = [set(build_video_dataset(source, s, frames=2).names) for s in ("train", "val", "test")]
    assert all(parts) and sorted(set.union(*parts)) == sorted(every.names)
    assert sum(len(part) for part in parts) == 7


def _stripes(period: int) -> torch.Tensor:
    """A scene (3, 64, 96) of vertical stripes, +1 and -1, `period` scene px each."""
    columns = (torch.arange(96) // period) % 2 * 2.0 - 1.0  # (96,)
    return columns.expand(3, 64, 96).clone()


def _one_clip(scene: torch.Tensor, supersample: int) -> torch.Tensor:
    """The first clip (T, 3, 16, 16) whose window is at least 1.8 frames wide (a pixel covers
    1.8 scene px or more)."""
    clips = PanZoomClips(
        scenes=[scene], names=["s"], num_clips=64, frames=4, frame_size=16, supersample=supersample
    )
    wide = next(i for i in range(64) if clips.motion(i).window >= 1.8)
    return clips.clip(wide)  # (T, 3, 16, 16)


def test_pan_supersample_is_a_box_filter_over_each_pixel():
    ramp = torch.linspace(-1, 1, 96).expand(3, 64, 96).clone()  # linear: box mean = centre sample
    assert torch.allclose(_one_clip(ramp, 4), _one_clip(ramp, 1), atol=1e-5)
    stripes = _stripes(1)  # finer than a frame pixel: point samples alias, a box averages them out
    point, box = _one_clip(stripes, 1), _one_clip(stripes, 4)
    assert point.abs().mean() > 0.25 and box.abs().mean() < 0.5 * point.abs().mean()


def _only_training_clips_differ(key: str, ours_value: str, theirs_value: str):
    """The tiny preset's pan datasets with `key` at two values: val / test / ood clips equal,
    the training clips not; returns the two training datasets."""
    ours = VideoModality(load_config("configs/video/tiny.toml", [f"{key}={ours_value}"]))
    theirs = VideoModality(load_config("configs/video/tiny.toml", [f"{key}={theirs_value}"]))
    for split in ("val", "test", "ood"):
        mine, other = ours.dataset(split), theirs.dataset(split)
        assert torch.equal(mine.batch(torch.arange(2)), other.batch(torch.arange(2)))
    mine, other = ours.dataset("train"), theirs.dataset("train")
    assert not torch.equal(mine.batch(torch.arange(2)), other.batch(torch.arange(2)))
    return mine, other


def test_only_training_clips_are_supersampled():
    ours, theirs = _only_training_clips_differ("data.train_supersample", "4", "1")
    assert ours.supersample == 4 and theirs.supersample == 1
    with pytest.raises(DataError, match="supersample >= 1"):
        build_video_dataset("pan", "train", supersample=0)


def test_only_training_pans_reach_down_to_still_cameras():
    ours, theirs = _only_training_clips_differ("data.train_min_pan_speed", "0", "0.5")
    slow = [ours.motion(i).speed for i in range(256)]
    usual = [theirs.motion(i).speed for i in range(256)]
    assert min(slow) < 0.05 and min(usual) >= 0.5 and max(slow) > 1.9
    with pytest.raises(DataError, match="min_speed"):
        build_video_dataset("pan", "train", min_speed=-0.1)
