"""`ebt denoise`: thinking curves, best-of-N, adaptive halting, the DiT and classical anchors,
photographs of any size by tiles, and its one-line errors (tiny runs, 8 x 8 crops)."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from ebt.api import load_run
from ebt.cli import main
from ebt.config import load_config
from ebt.denoise import DenoiseOptions, ImageVerdict, halt_images, think_images
from ebt.inference import thinking_passes
from ebt.tiling import blend_window, denoise_tiled, tile_starts, tile_weights
from ebt.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.image_size=8",
    "data.diffusion_steps=10",  # a 100-step schedule: DDIM from 0.1 is 10 DiT evaluations
    "model.dim=16",
    "model.layers=1",
    "model.heads=2",
    "model.patch_size=4",
    "train.batch_size=4",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.eval_every=0",
    "train.save_every=0",
    "train.progress=false",
    "train.num_threads=1",
    "train.device=cpu",
]


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
    for name, config in (("ebt", "image/tiny.toml"), ("dit", "image/dit-tiny.toml")):
        train(load_config(ROOT / "configs" / config, [*TINY, f"train.out_dir={root / name}"]))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"the cat sat on mat {n}." for n in range(40)))
    text = [f"data.source={corpus}", "data.seq_len=8", "model.dim=16", "model.layers=1"]
    text += ["model.heads=2", "train.batch_size=2", "train.max_steps=1", "train.eval_every=0"]
    text += ["train.progress=false", "train.num_threads=1", f"train.out_dir={root / 'text'}"]
    train(load_config(ROOT / "configs" / "text" / "tiny.toml", text))
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


def test_tiles_cover_the_image_and_blend_exactly():
    assert tile_starts(37, 8, 4) == [0, 4, 8, 12, 16, 20, 24, 28, 29]
    assert tile_starts(8, 8, 4) == [0]
    weights = tile_weights(32, 32, 8, 4)  # (H, W)
    assert bool((weights > 0).all())
    inner = weights[4:28, 4:28]  # sin^2 windows half a tile apart sum to exactly 1
    torch.testing.assert_close(inner, torch.ones_like(inner), atol=1e-12, rtol=0)
    assert float(blend_window(8).min()) > 0
    image = torch.rand(3, 37, 50) * 2 - 1  # (C, H, W): not a multiple of the tile
    identity = lambda tiles: ImageVerdict(tiles, None, 1.0)  # noqa: E731
    out, passes, tiles = denoise_tiled(image, identity, tile=8, stride=4, batch_size=7)
    assert tiles == 9 * 12 and passes == 1.0
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)
    small, _, _ = denoise_tiled(image[:, :5, :6], identity, tile=8, stride=4)  # padded
    torch.testing.assert_close(small, image[:, :5, :6], atol=1e-6, rtol=0)


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
    monkeypatch.setattr("ebt.tiling.make_denoiser", identity)
    denoise(capsys, runs["ebt"], "--input", photo, "--output", out)
    rgb = np.repeat(pixels[..., None], 3, axis=-1) if kind == "gray" else pixels[..., :3]
    assert np.array_equal(iio.imread(out), rgb)


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
