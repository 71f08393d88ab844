"""Frame encoders (pixels, a frozen diffusers AutoencoderKL), their on-disk cache, and the wide
frame Linear's written-out gradients. The VAE is a small random one saved to tmp: no download."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from support import ROOT
from support.text import training_rows
from support.vision import evaluation_rows, events, same_weights, video_config, write_tiny_vae

from ebt.config import ConfigError, load_config
from ebt.data.corpus import DataError
from ebt.data.frame_encoders import (
    EncodedClips,
    FrameCache,
    PixelEncoder,
    VaeEncoder,
    build_frame_encoder,
    encoded_dataset,
)
from ebt.data.video import build_video_dataset
from ebt.modalities.video.task import VideoModality
from ebt.models import frame_dim
from ebt.training.trainer import train

CONFIGS = ROOT / "configs" / "video"
SIZE = 16  # frames of 16 x 16: latents 4 x 2 x 2
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: threads only spin


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A small randomly initialised AutoencoderKL (downsampling 8, 4 latent channels)."""
    return write_tiny_vae(tmp_path_factory.mktemp("vae"), blocks=4, size=SIZE)


def vae_config(vae_dir: Path, tmp_path: Path, *overrides: str):
    """The tiny video preset on `vae_dir`'s latents of SIZE x SIZE frames, cached under
    tmp_path/frames, trained 4 steps into tmp_path/run."""
    encoder = ["data.frame_encoder=vae", f"data.vae={vae_dir}", f"data.frame_size={SIZE}"]
    cache = f"data.cache_dir={tmp_path / 'frames'}"
    return video_config(tmp_path / "run", "frame-tiny.toml", *encoder, cache, *overrides)


def frames(count: int = 5, size: int = SIZE) -> torch.Tensor:
    return torch.rand(count, 3, size, size) * 2 - 1  # (N, 3, F, F)


def test_pixels_are_the_flattened_frames():
    encoder, x = PixelEncoder(), frames()
    assert encoder.frame_dim(SIZE) == 3 * SIZE**2
    assert torch.equal(encoder.encode(x), x.flatten(1))
    assert torch.equal(encoder.decode(encoder.encode(x), SIZE), x)


@pytest.mark.parametrize("size", [16, 32, 224])
def test_vae_frame_dim_is_4_times_the_side_over_8_squared(vae_dir, tmp_path, size):
    encoder = VaeEncoder(str(vae_dir))
    assert encoder.frame_dim(size) == 4 * (size // 8) ** 2
    config = vae_config(vae_dir, tmp_path, f"data.frame_size={size}")
    assert frame_dim(config) == encoder.frame_dim(size)
    if size <= 32:
        assert encoder.encode(frames(2, size)).shape == (2, 4 * (size // 8) ** 2)


def test_vae_latents_are_the_scaled_mean_and_decode_inverts_the_scaling(vae_dir):
    encoder, x = VaeEncoder(str(vae_dir), scaling=0.18215), frames()
    vae = encoder.vae
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean  # (N, 4, 2, 2)
        decoded = vae.decode(mean).sample.clamp(-1, 1)  # (N, 3, F, F)
    vectors = encoder.encode(x)
    torch.testing.assert_close(vectors, mean.flatten(1) * 0.18215)
    torch.testing.assert_close(encoder.decode(vectors, SIZE), decoded)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


@pytest.mark.parametrize("source", ["pan", "skimage-gif"])
def test_cache_round_trip_reads_the_second_time(vae_dir, tmp_path, source):
    config = vae_config(vae_dir, tmp_path, f"data.source={source}")
    first = VideoModality(config).dataset("val")
    assert isinstance(first, EncodedClips)
    indices = torch.arange(min(4, len(first)))
    encoded = first.batch(indices)  # (B, T, frame_dim)
    assert encoded.shape == (len(indices), 4, 16)
    assert first.cache.misses > 0 and first.cache.encoder.encoded_frames > 0
    second = VideoModality(config).dataset("val")
    again = second.batch(indices)
    assert torch.equal(again, encoded)
    assert second.cache.misses == 0 and second.cache.encoder.encoded_frames == 0
    assert second.cache.hits > 0
    fresh = second.cache.encoder.encode(second.clips.batch(indices).flatten(0, 1))
    torch.testing.assert_close(again.flatten(0, 1), fresh)  # cached == recomputed


def test_file_videos_are_encoded_once_per_video(vae_dir, tmp_path):
    dataset = VideoModality(vae_config(vae_dir, tmp_path, "data.source=skimage-gif")).dataset("all")
    dataset.batch(torch.arange(len(dataset)))  # every clip, overlapping frames
    assert dataset.cache.misses == 1
    assert dataset.cache.encoder.encoded_frames == dataset.clips.videos[0].shape[0]


def test_cache_key_follows_the_frames_and_the_encoder(vae_dir, tmp_path):
    plain = FrameCache(VaeEncoder(str(vae_dir)), tmp_path)
    scaled = FrameCache(VaeEncoder(str(vae_dir), scaling=0.18215), tmp_path)
    x = frames()
    assert plain.directory != scaled.directory
    assert plain.path(x) != plain.path(x + 1e-3) and plain.path(x) == plain.path(x.clone())
    torch.testing.assert_close(scaled.encode(x), plain.encode(x) * 0.18215)


def test_a_torn_cache_file_is_encoded_again(vae_dir, tmp_path):
    cache, x = FrameCache(VaeEncoder(str(vae_dir)), tmp_path), frames()
    expected = cache.encode(x)
    cache.path(x).write_bytes(b"torn")
    assert torch.equal(cache.encode(x), expected) and cache.misses == 2


def test_a_full_disk_at_the_frame_cache_is_one_warning_and_encoding_goes_on(
    vae_dir, tmp_path, monkeypatch, capsys
):
    """As the token cache: a cache write that fails for no space is said once on stderr, later
    frames are encoded without trying again, and no temporary file is left."""
    real_replace = os.replace

    def replace(source, target, *args, **kwargs):
        if Path(target).is_relative_to(tmp_path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    cache, x = FrameCache(VaeEncoder(str(vae_dir)), tmp_path), frames()
    expected = VaeEncoder(str(vae_dir)).encode(x)
    torch.testing.assert_close(cache.encode(x), expected)
    torch.testing.assert_close(cache.encode(x + 0.5), VaeEncoder(str(vae_dir)).encode(x + 0.5))
    err = capsys.readouterr().err
    assert err.count("ebt: could not write the frame cache") == 1, err
    assert "no space left on device" in err and cache.misses == 2
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]


def test_a_frame_size_the_vae_cannot_take_is_one_line(vae_dir, tmp_path):
    with pytest.raises(ConfigError, match="not a multiple of 8") as error:
        vae_config(vae_dir, tmp_path, "data.frame_size=20")
    assert len(str(error.value).splitlines()) == 1
    config = vae_config(vae_dir, tmp_path, "data.frame_size=20", "data.frame_dim=20")
    with pytest.raises(DataError, match="multiple of 8 pixels") as error:
        VideoModality(config).dataset("val")
    assert len(str(error.value).splitlines()) == 1


def test_a_frame_dim_the_encoder_does_not_make_is_refused(tmp_path):
    config = load_config(CONFIGS / "frame-tiny.toml", ["data.frame_dim=3136"])
    clips = build_video_dataset("pan", "val", frames=4, frame_size=16, num_clips=4)
    with pytest.raises(DataError, match="pixels encoder makes 768 numbers") as error:
        encoded_dataset(clips, config)
    assert len(str(error.value).splitlines()) == 1


def test_an_unloadable_vae_is_one_line(tmp_path):
    empty = tmp_path / "not-a-vae"
    empty.mkdir()
    config = load_config(
        CONFIGS / "frame-tiny.toml", ["data.frame_encoder=vae", f"data.vae={empty}"]
    )
    with pytest.raises(DataError, match="cannot load the VAE") as error:
        build_frame_encoder(config)
    assert len(str(error.value).splitlines()) == 1


def test_pixels_need_no_wrapper():
    config = load_config(CONFIGS / "frame-tiny.toml", ["data.frames=4"])
    clips = build_video_dataset("pan", "val", frames=4, frame_size=16, num_clips=4)
    assert encoded_dataset(clips, config) is clips


def test_a_vae_run_resumes_exactly_with_its_cache_moved(vae_dir, tmp_path, restore_threads):
    """4 steps, then resumed to 6 with the latent cache in a new place (encoded again): the
    resumed run continues from step 4 and logs the uninterrupted 6-step run's history."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    six = ["train.max_steps=6", "train.schedule_steps=6"]
    result = train(vae_config(vae_dir, tmp_path, *six, f"train.out_dir={whole}"))
    assert result["frames"] == 4 * 3 and any((tmp_path / "frames").rglob("*.safetensors"))
    train(vae_config(vae_dir, tmp_path, *six, f"train.out_dir={split}", "train.max_steps=4"))
    moved = [f"train.out_dir={split}", f"data.cache_dir={tmp_path / 'b'}"]
    train(vae_config(vae_dir, tmp_path, *six, *moved))
    assert any((tmp_path / "b").rglob("*.safetensors"))
    assert [(row["event"], row["step"]) for row in events(split)] == [("resume", 4)]
    assert [row["step"] for row in training_rows(split)] == [1, 2, 3, 4, 5, 6]
    assert training_rows(split) == training_rows(whole)
    assert evaluation_rows(split) == evaluation_rows(whole)
    assert same_weights(whole, split)


def test_latent_runs_measure_psnr_on_decoded_frames(vae_dir, tmp_path):
    from ebt.modalities import modality_for
    from ebt.modalities.video.task import frame_psnr

    config = vae_config(vae_dir, tmp_path)
    task = modality_for(config).task("val")
    encoder = build_frame_encoder(config)
    size = config.data.frame_size
    frames = torch.rand(6, 3, size, size) * 2 - 1  # (B * S, 3, F, F)
    latents = encoder.encode(frames).view(2, 3, -1)  # (B, S, F)
    noisy = latents + 0.3 * torch.randn_like(latents)
    quality = task.quality(noisy, latents)
    decoded = [
        encoder.decode(vectors.flatten(0, 1), size).flatten(1).view(2, 3, -1)  # (B, S, 3 F^2)
        for vectors in (noisy, latents)
    ]
    assert quality["psnr"] == pytest.approx(float(frame_psnr(*decoded).mean()), rel=1e-5)
    assert quality["psnr"] != pytest.approx(float(frame_psnr(noisy, latents).mean()), rel=1e-3)
