"""`ebt denoise`: thinking curves, best-of-N, adaptive halting, the DiT and classical anchors,
photographs of any size by tiles, and its one-line errors (tiny runs, 8 x 8 crops)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from support import CONFIGS
from support.vision import image_config

from ebt.api import load_run
from ebt.cli.main import main
from ebt.config import load_config
from ebt.modalities.image.denoise import DenoiseOptions, ImageVerdict, halt_images, think_images
from ebt.modalities.image.tiling import denoise_tiled, tile_starts
from ebt.thinking.selection import thinking_passes
from ebt.training.trainer import train

TINY = ["data.diffusion_steps=10", "train.max_steps=2", "train.eval_every=0"]  # DDIM from 0.1:
# a 100-step schedule's 10 DiT evaluations; two steps, no evaluation


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run far faster on one intra-op thread than with OpenMP on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny image EBT, its DiT twin and a tiny text run, each trained for two steps."""
    root = tmp_path_factory.mktemp("denoise")
    threads = torch.get_num_threads()
    for name, config in (("ebt", "tiny.toml"), ("dit", "dit-tiny.toml")):
        train(image_config(root / name, config, *TINY))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"the cat sat on mat {n}." for n in range(40)))
    text = [f"data.source={corpus}", "data.seq_len=8", "model.dim=16", "model.layers=1"]
    text += ["model.heads=2", "train.batch_size=2", "train.max_steps=1", "train.eval_every=0"]
    text += ["train.progress=false", "train.num_threads=1", f"train.out_dir={root / 'text'}"]
    train(load_config(CONFIGS / "text" / "tiny.toml", text))
    torch.set_num_threads(threads)
    return {"ebt": root / "ebt", "dit": root / "dit", "text": root / "text"}


def denoise(capsys, *argv: str) -> dict:
    """`ebt denoise ... --json` in-process: its JSON object."""
    assert main(["denoise", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def fails(capsys, *argv: str) -> str:
    """`ebt denoise ...` that must fail in one line with status 2: its stderr."""
    assert main(["denoise", *map(str, argv)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ebt: error: ") and error.count("\n") == 1
    return error


def rejected(capsys, *argv: str) -> str:
    """`ebt denoise ...` whose flags argparse refuses (status 2): its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(["denoise", *map(str, argv)])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_curves_structure_forward_passes_and_halting(runs, capsys):
    flags = ["--noise-level", "0.1,0.2", "--steps", "1,2", "--samples", "1,3", "--batches", "1"]
    result = denoise(capsys, runs["ebt"], *flags, "--halt-tolerance", "1e-9")
    assert result["images"] == 4 and result["options"]["perturbation"] == 0.05
    assert [level["noise_level"] for level in result["levels"]] == [0.1, 0.2]
    for level in result["levels"]:
        assert level["noisy"]["psnr"] < 40 and "dit" not in level and "classical" not in level
        fixed = [p for p in level["ebt"] if not p.get("adaptive")]
        assert [(p["steps"], p["samples"]) for p in fixed] == [(1, 1), (1, 3), (2, 1), (2, 3)]
        for point in fixed:
            assert point["forward_passes"] == thinking_passes(point["steps"], point["samples"], 1)
            assert -1 <= point["energy_mse_pearson"] <= 1 and point["seconds"] >= 0
            assert -1 <= point["energy_mse_spearman"] <= 1
        assert fixed[0]["psnr"] != fixed[2]["psnr"]  # a second step changes the images
        adaptive = [p for p in level["ebt"] if p.get("adaptive")]
        for point, same in zip(adaptive, fixed[::2], strict=True):  # tolerance ~0: fixed steps
            assert point["steps_taken"]["counts"] == {str(point["steps"]): 4}
            assert point["psnr"] == pytest.approx(same["psnr"], abs=1e-4)
    assert thinking_passes(2, 3, 1) == 2 * 3 + 3  # + one verification forward per sample


def test_the_dit_to_compare_and_the_grid(runs, capsys, tmp_path):
    grid = tmp_path / "grid.png"
    flags = ["--noise-level", "0.1", "--steps", "1", "--samples", "1", "--batches", "1"]
    result = denoise(capsys, runs["ebt"], *flags, "--compare", runs["dit"], "--grid", grid)
    level = result["levels"][0]
    assert level["dit"]["forward_passes"] == level["timestep"] + 1 == 10
    assert result["compare"].startswith(str(runs["dit"]))
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["grid"] == str(grid)


def test_classical_anchors(runs, capsys):
    flags = ["--noise-level", "0.2", "--steps", "1", "--samples", "1", "--batches", "1"]
    level = denoise(capsys, runs["ebt"], *flags, "--classical", "--split", "test")["levels"][0]
    assert set(level["classical"]) == {"nl_means", "tv_chambolle", "wavelet"}
    for point in level["classical"].values():
        assert point["psnr"] > level["noisy"]["psnr"] and point["forward_passes"] is None


def test_accept_lower_energies_doubles_the_forward_passes(runs, capsys):
    flags = ["--noise-level", "0.1", "--steps", "2", "--samples", "1", "--batches", "1"]
    result = denoise(capsys, runs["ebt"], *flags, "--accept-lower-energies")
    assert result["levels"][0]["ebt"][0]["forward_passes"] == 4
    assert result["options"]["accept_lower_energies"] is True


def test_a_dit_run_alone_denoises_by_ddim(runs, capsys):
    result = denoise(capsys, runs["dit"], "--noise-level", "0.1", "--batches", "1")
    level = result["levels"][0]
    assert "ebt" not in level and level["dit"]["forward_passes"] == 10


@pytest.fixture(scope="module")
def model(runs):
    return load_run(runs["ebt"]).model


def test_best_of_n_keeps_the_lowest_final_energy_per_image(model):
    noisy = torch.randn(5, 3, 8, 8) * 0.5  # (B, C, H, W)
    options = DenoiseOptions(perturbation=0.3)
    torch.manual_seed(1)
    verdict = think_images(model, noisy, steps=2, samples=3, opts=options)
    torch.manual_seed(1)  # the same starts, thought one sample at a time
    starts = noisy.expand(3, *noisy.shape).clone()  # (N, B, C, H, W)
    starts[1:] += 0.3 * torch.randn_like(starts[1:])
    finals = torch.stack([model.think(start, steps=2).states[-1] for start in starts])
    with torch.no_grad():
        energies = torch.stack([model(final) for final in finals])  # (N, B)
    best = energies.argmin(dim=0)  # (B,)
    assert len(set(best.tolist())) > 1  # not always the unperturbed start
    expected = finals[best, torch.arange(5)]  # (B, C, H, W)
    torch.testing.assert_close(verdict.images, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(verdict.energies, energies.min(dim=0).values, atol=1e-6, rtol=1e-5)
    assert verdict.forward_passes == 2 * 3 + 3


def test_adaptive_halting_stops_images_within_the_budget(model):
    noisy = torch.randn(6, 3, 8, 8) * 0.5  # (B, C, H, W)
    early = halt_images(model, noisy, 4, DenoiseOptions(tolerance=1e9))
    assert early.steps.tolist() == [1] * 6 and early.forward_passes == 2  # the 2nd step saw dE
    exact = halt_images(model, noisy, 3, DenoiseOptions(tolerance=1e-12))
    fixed = think_images(model, noisy, 3, 1, DenoiseOptions())
    assert exact.steps.tolist() == [3] * 6 and exact.forward_passes == 3
    torch.testing.assert_close(exact.images, fixed.images, atol=1e-6, rtol=1e-6)


def flat_colours(tiles: torch.Tensor) -> ImageVerdict:
    """A denoiser that is not the identity: each tile (n, C, t, t) comes back as its mean
    colour, so a blended pixel depends on how the overlapping tiles are weighted."""
    flat = tiles.mean(dim=(2, 3), keepdim=True).expand_as(tiles).clone()  # (n, C, t, t)
    return ImageVerdict(flat, None, 2.0)


def sin2_blend(image: torch.Tensor, tile: int, stride: int) -> torch.Tensor:
    """flat_colours' tiles blended, written out pixel by pixel in float64: each pixel's mean of
    the colours of the tiles covering it, weighted by sin^2(pi (i + 1/2) / tile) sin^2(pi (j +
    1/2) / tile) at its place (i, j) in each tile."""
    image = image.double()
    ramp = [math.sin(math.pi * (i + 0.5) / tile) ** 2 for i in range(tile)]
    total = torch.zeros(image.shape, dtype=torch.float64)  # (C, H, W)
    weights = torch.zeros(image.shape[1:], dtype=torch.float64)  # (H, W)
    for top in tile_starts(image.shape[1], tile, stride):
        for left in tile_starts(image.shape[2], tile, stride):
            colour = image[:, top : top + tile, left : left + tile].mean(dim=(1, 2))  # (C,)
            for i in range(tile):
                for j in range(tile):
                    total[:, top + i, left + j] += ramp[i] * ramp[j] * colour
                    weights[top + i, left + j] += ramp[i] * ramp[j]
    return total / weights


def test_tiles_cover_the_image_and_blend_with_the_sin2_window():
    """denoise_tiled (what `ebt denoise --input` runs) with a denoiser that is not the identity
    equals the sin^2 blend written out (float64, 1e-12)."""
    assert tile_starts(37, 8, 4) == [0, 4, 8, 12, 16, 20, 24, 28, 29]
    assert tile_starts(50, 8, 4) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 42]
    assert tile_starts(8, 8, 4) == [0]
    image = torch.rand(3, 37, 50, dtype=torch.float64) * 2 - 1  # (C, H, W): not a multiple
    out, passes, count = denoise_tiled(image, flat_colours, tile=8, stride=4, batch_size=7)
    assert count == 9 * 12 and passes == 2.0
    torch.testing.assert_close(out, sin2_blend(image, 8, 4), atol=1e-12, rtol=0)
    assert (out - image).abs().max() > 0.1  # the denoiser changed the image
    identity = lambda tiles: ImageVerdict(tiles, None, 1.0)  # noqa: E731
    small, _, _ = denoise_tiled(image[:, :5, :6], identity, tile=8, stride=4)  # padded
    torch.testing.assert_close(small, image[:, :5, :6], atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["gray", "rgba"])
def test_a_photograph_round_trips(runs, capsys, tmp_path, monkeypatch, kind):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (19, 26) if kind == "gray" else (19, 26, 4), dtype=np.uint8)
    photo, out = tmp_path / f"{kind}.png", tmp_path / "out.png"
    iio.imwrite(photo, pixels)
    result = denoise(capsys, runs["ebt"], "--input", photo, "--output", out, "--add-noise", "0.1")
    assert iio.imread(out).shape == (19, 26, 3) and result["tiles"] == 4 * 6
    assert {"psnr_noisy", "psnr_denoised", "psnr_gain", "seconds"} <= set(result)
    result = denoise(capsys, runs["dit"], "--input", photo, "--output", out, "--add-noise", "0.2")
    assert result["forward_passes_per_tile"] == 20
    identity = lambda *args, **kwargs: lambda tiles: ImageVerdict(tiles, None, 0.0)  # noqa: E731
    monkeypatch.setattr("ebt.modalities.image.tiling.make_denoiser", identity)
    denoise(capsys, runs["ebt"], "--input", photo, "--output", out)
    rgb = np.repeat(pixels[..., None], 3, axis=-1) if kind == "gray" else pixels[..., :3]
    assert np.array_equal(iio.imread(out), rgb)
    monkeypatch.setattr(
        "ebt.modalities.image.tiling.make_denoiser", lambda *args, **kwargs: flat_colours
    )
    denoise(capsys, runs["ebt"], "--input", photo, "--output", out)  # tiles of 8, stride 4
    image = torch.from_numpy(rgb).permute(2, 0, 1).double() / 127.5 - 1  # (3, H, W)
    expected = ((sin2_blend(image, 8, 4) + 1) * 127.5).permute(1, 2, 0).numpy()  # (H, W, 3)
    difference = np.abs(iio.imread(out).astype(np.float64) - expected)
    assert difference.max() <= 0.5 + 1e-4  # the written PNG is the blend, rounded to uint8


def test_one_line_errors(runs, capsys, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    iio.imwrite(tmp_path / "tiny.png", np.zeros((3, 9), dtype=np.uint8))
    out = ["--output", tmp_path / "o.png"]
    cases = [
        ((runs["ebt"], "--input", tmp_path / "notes.png", *out), "cannot read image"),
        ((runs["ebt"], "--input", tmp_path / "tiny.png", *out), "smaller than one 4x4 patch"),
        ((runs["text"],), f"{runs['text']} is a text run; ebt denoise needs an image run"),
        ((runs["ebt"], "--compare", runs["ebt"]), "--compare needs a DiT run"),
        ((runs["ebt"], "--output", tmp_path / "o.png"), "only with --input"),
        ((runs["ebt"], "--input", tmp_path / "tiny.png"), "--input needs --output"),
        ((runs["ebt"], "--input", tmp_path / "t.png", *out, "--steps", "1,2"), "one value"),
        ((runs["ebt"], "--halt-tolerance", "0.1", "--accept-lower-energies"), "combine"),
    ]
    for argv, message in cases:
        assert message in fails(capsys, *argv)
    bad = [("--noise-level", "0"), ("--noise-level", "0.1,1.5"), ("--steps", "0")]
    bad += [("--samples", "1,x"), ("--add-noise", "2"), ("--perturbation", "-1")]
    for flag, value in bad:
        assert "must be" in rejected(capsys, runs["ebt"], flag, value)
