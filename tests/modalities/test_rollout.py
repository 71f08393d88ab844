"""Video rollout and thinking at inference: the KV-cached rollout equals recomputing every frame
(float64, every step conditioning, best-of-N, Langevin noise, adaptive halting, the window
restart), best-of-N keeps the start of lowest final energy, adaptive halting stops early within
its budget, every predicted frame carries its final energy, and `ebt rollout` works end to end
on tiny runs trained here (JSON, strip, GIF, plot, bench, --video) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from support.vision import image_config, video_config, video_model, write_tiny_vae

from ebt.cli.main import main
from ebt.modalities.video.rollout import CopyLast, horizon_metrics, predictor_for, rollout
from ebt.modalities.video.thinking import FrameThinking, initial_frames, think_next_frame
from ebt.nn.kv_cache import KeyValueBuffer
from ebt.thinking.loop import InferenceOptions
from ebt.training.trainer import train

VARIANTS = ("time_embed", "adaln", "default", "pred_step")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only spin
FRAMES, SIZE, BATCH = 5, 2, 2  # a window of 4 context frames of 3 x 2 x 2 = 12 numbers
FRAME_DIM = 3 * SIZE * SIZE


def make_model(variant: str = "time_embed", kind: str = "ebt", noise: float = 0.0):
    """A tiny float64 video model (support.vision.video_model) of FRAMES-frame clips, eval."""
    return video_model(variant, kind, frames=FRAMES, noise=noise).eval()


def context_frames(count: int = 3) -> torch.Tensor:
    """The same random frames (B, C, F) in [-1, 1] at every call."""
    generator = torch.Generator().manual_seed(count)
    frames = torch.rand(BATCH, count, FRAME_DIM, dtype=torch.float64, generator=generator)
    return frames * 2 - 1  # (B, C, F)


def both_ways(model, thinking: FrameThinking, horizon: int = 7, seed: int = 1) -> dict:
    """The rollout with the KV cache and with recompute, from the same random numbers."""
    context = context_frames()
    results = {}
    for cached in (True, False):
        torch.manual_seed(seed)
        results[cached] = rollout(predictor_for(model, thinking, cached=cached), context, horizon)
    return results


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_rollout_equals_recompute(variant):
    """Best-of-3 from perturbed starts with Langevin noise, 7 frames after 3: the sequence
    outgrows the 4-frame window twice, so the cache is also rebuilt."""
    thinking = FrameThinking(steps=2, samples=3, perturbation=0.2)
    results = both_ways(make_model(variant, noise=0.05), thinking)
    cached, recomputed = results[True], results[False]
    assert cached.frames.shape == (BATCH, 7, FRAME_DIM)
    torch.testing.assert_close(cached.frames, recomputed.frames, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cached.energies, recomputed.energies, rtol=1e-10, atol=1e-10)
    assert torch.equal(cached.steps, recomputed.steps)
    assert cached.passes == recomputed.passes == 2 * 2 * 3 + 3  # 4 steps x 3 starts + verify


def test_step_size_noise_and_accept_lower_overrides_reach_the_rollout():
    """--step-size / --langevin-noise / --accept-lower-energies: cached still equals recompute;
    a changed step size or noise changes the frames; accept-lower costs one more evaluation."""
    model = make_model("pred_step", noise=0.05)
    trained = both_ways(model, FrameThinking(steps=2))[True]
    options = InferenceOptions(step_size=0.5, langevin_noise=0.0, accept_lower_energies=True)
    results = both_ways(model, FrameThinking(steps=2, options=options))
    torch.testing.assert_close(results[True].frames, results[False].frames, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(results[True].frames, trained.frames)
    assert results[True].passes == 2 * 2 * 2 and trained.passes == 2 * 2


@pytest.mark.parametrize("tolerance", [1e-3, 0.5])
def test_cached_rollout_equals_recompute_when_halting(tolerance):
    thinking = FrameThinking(steps=4, samples=2, halt_tolerance=tolerance)
    results = both_ways(make_model("adaln"), thinking)
    torch.testing.assert_close(results[True].frames, results[False].frames, rtol=1e-10, atol=1e-10)
    assert torch.equal(results[True].steps, results[False].steps)


def test_transformer_cached_rollout_equals_recompute():
    results = both_ways(make_model(kind="transformer_pp"), FrameThinking(), horizon=9)
    torch.testing.assert_close(results[True].frames, results[False].frames, rtol=1e-12, atol=1e-12)
    assert results[True].energies is None and results[True].passes == 1


def test_rollout_feeds_back_its_own_predictions():
    """Frame h is predicted from the context and predictions 1..h-1: a 2-frame rollout's
    second frame equals a 1-frame rollout from the context plus the first prediction."""
    model, context = make_model(), context_frames()
    torch.manual_seed(0)
    two = rollout(predictor_for(model, FrameThinking()), context, 2)
    extended = torch.cat((context, two.frames[:, :1]), dim=1)  # (B, C + 1, F)
    one = rollout(predictor_for(model, FrameThinking()), extended, 1)
    torch.testing.assert_close(one.frames[:, 0], two.frames[:, 1], rtol=1e-10, atol=1e-10)
    copy = rollout(CopyLast(), context, 3)
    assert torch.equal(copy.frames, context[:, -1:].expand(-1, 3, -1))


def _think_once(model, context, starts, thinking):
    """think_next_frame for the frame after context (B, C, F) from starts (B, N, F)."""
    caches = {}
    for landscape in range(model.args.landscapes):
        caches[landscape] = model.encode_context(context, landscape)
    return think_next_frame(model, caches, starts, context.shape[1] - 1, thinking)


def test_best_of_n_keeps_the_lowest_final_energy():
    model, context = make_model(), context_frames()
    thinking = FrameThinking(steps=2, samples=4, perturbation=0.5)
    starts = initial_frames(model, context[:, -1], thinking)  # (B, 4, F)
    assert not torch.equal(starts[:, 0], starts[:, 1])
    verdict = _think_once(model, context, starts, thinking)
    single = FrameThinking(steps=2)
    alone = [_think_once(model, context, starts[:, n : n + 1], single) for n in range(4)]
    energies = torch.stack([v.energies for v in alone], dim=1)  # (B, 4)
    best = energies.argmin(dim=1)  # (B,)
    torch.testing.assert_close(verdict.energies, energies.min(dim=1).values)
    for clip in range(BATCH):
        torch.testing.assert_close(verdict.frames[clip], alone[best[clip]].frames[clip])
    assert verdict.passes == 4 * 4 + 4


def test_final_energy_of_every_frame_is_the_models_energy_of_it():
    model, context = make_model("time_embed"), context_frames()
    torch.manual_seed(0)
    result = rollout(predictor_for(model, FrameThinking(steps=3)), context, 4)
    assert result.energies.shape == result.steps.shape == (BATCH, 4)
    assert torch.isfinite(result.energies).all() and (result.steps == 6).all()
    last = model.args.landscapes - 1
    cache = model.encode_context(context, last)  # the first frame's own context
    rows = torch.tensor([context.shape[1] - 1])
    energy = model.energies(cache, result.frames[:, :1], rows)  # (B, 1)
    torch.testing.assert_close(result.energies[:, 0], energy[:, 0], rtol=1e-10, atol=1e-10)


def test_adaptive_halting_stops_early_within_its_budget():
    model = make_model("default")
    budget = 2 * 6  # 6 steps per landscape, 2 landscapes
    fixed = both_ways(model, FrameThinking(steps=6), horizon=4)[True]
    never = both_ways(model, FrameThinking(steps=6, halt_tolerance=1e-300), horizon=4)[True]
    soon = both_ways(model, FrameThinking(steps=6, halt_tolerance=1e3), horizon=4)[True]
    assert (never.steps == budget).all() and (soon.steps == 1).all()
    torch.testing.assert_close(never.frames, fixed.frames, rtol=1e-10, atol=1e-10)
    some = both_ways(model, FrameThinking(steps=6, halt_tolerance=1e-2), horizon=4)[True]
    assert (some.steps >= 1).all() and (some.steps <= budget).all()
    assert soon.passes < some.passes <= never.passes == budget


def test_frame_thinking_refuses_bad_values():
    bad_values = [{"samples": 0}, {"steps": 0}, {"halt_tolerance": 0.0}, {"init": "bad"}]
    for bad in [*bad_values, {"starts": "shifts"}]:
        with pytest.raises(ValueError):
            FrameThinking(**bad)
    with pytest.raises(ValueError, match="accept_lower_energies"):
        FrameThinking(halt_tolerance=0.1, options=InferenceOptions(accept_lower_energies=True))


def test_horizon_metrics_of_perfect_and_known_frames():
    truth = torch.rand(2, 3, 3, 8, 8) * 2 - 1  # (B, H, 3, S, S)
    perfect = horizon_metrics(truth, truth)
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["loss"] == 0
    assert set(perfect["horizons"]) == {"1"}
    off = horizon_metrics((truth + 20 / 127.5).clamp(-1, 1), truth)
    assert 0 < off["psnr"] < perfect["psnr"] and off["ssim"] < 1
    assert len(off["all"]["psnr"]) == 3


def test_key_value_buffer_made_in_inference_mode_grows_outside_it():
    with torch.inference_mode():
        buffer = KeyValueBuffer(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    assert not buffer.keys.is_inference()
    keys, values = buffer.append(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))  # grows
    assert keys.shape == values.shape == (1, 2, 8, 4) and not keys.is_inference()


# --- `ebt rollout` end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny video EBT and its Transformer++ twin, trained 4 steps each."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("rollout")
    train(video_config(root / "ebt", "frame-tiny.toml"))
    train(video_config(root / "baseline", "frame-baseline-tiny.toml"))
    torch.set_num_threads(threads)
    return root


def _rollout_json(capsys, *argv: str) -> dict:
    """The --json report of `ebt rollout ARGV`, its stderr under "stderr"."""
    capsys.readouterr()
    assert main(["rollout", *argv, "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out) | {"stderr": captured.err}


def test_rollout_command_end_to_end(runs, tmp_path, capsys):
    argv = [str(runs / "ebt"), "--compare", str(runs / "baseline"), "--context", "2"]
    argv += ["--frames", "4", "--clips", "2", "--samples", "2", "--bench", "--repeats", "1"]
    pictures = {"--gif": "r.gif", "--strip": "strip.png", "--plot": "energy.png"}
    for flag, name in pictures.items():
        argv += [flag, str(tmp_path / name)]
    report = _rollout_json(capsys, *argv)
    assert report["split"] == "val" and report["source"] == "pan"
    assert (report["context"], report["frames"], report["clips"]) == (2, 4, 2)
    assert set(report["models"]) == {"ebt", "transformer_pp", "copy_last"}
    for result in report["models"].values():
        assert set(result["horizons"]) == {"1", "4"}
        assert {"psnr", "ssim", "loss"} == set(result["horizons"]["4"]) == set(result["all"])
        assert {"ms_per_frame", "forward_passes_per_frame"} <= set(result)
    ebt = report["models"]["ebt"]
    assert len(ebt["energy"]) == len(ebt["steps"]) == 4 and ebt["forward_passes_per_frame"] == 6
    assert "energy_error_correlation" in ebt and report["thinking"]["samples"] == 2
    assert set(report["bench"]) == {"ebt", "transformer_pp"}
    for bench in report["bench"].values():
        assert bench["max_abs_difference"] < 1e-3 and bench["cached_ms_per_frame"] > 0
    for name in pictures.values():
        assert (tmp_path / name).stat().st_size > 0
    assert iio.imread(tmp_path / "r.gif").shape[0] == 2 + 4  # context, then predictions


def test_rollout_out_of_distribution_and_text_summary(runs, capsys):
    report = _rollout_json(capsys, str(runs / "ebt"), "--ood", "--context", "3", "--frames", "2")
    assert report["split"] == "ood" and report["models"]["ebt"]["horizons"].keys() == {"1"}
    assert main(["rollout", str(runs / "ebt"), "--context", "2", "--frames", "1"]) == 0
    assert "PSNR@1" in capsys.readouterr().out
    argv = [str(runs / "baseline"), "--compare", str(runs / "ebt"), "--frames", "1"]
    report = _rollout_json(capsys, *argv, "--context", "2")
    assert set(report["models"]) == {"transformer_pp", "ebt", "copy_last"}
    assert report["thinking"]["init"] == "zeros"  # the EBT's own think.init (frame-tiny.toml)


def _write_gif(path: Path, frames: int) -> Path:
    rng = np.random.default_rng(0)
    iio.imwrite(path, rng.integers(0, 255, (frames, 12, 10, 3), dtype=np.uint8), duration=50)
    return path


def test_rollout_of_a_video_file(runs, tmp_path, capsys):
    video = str(_write_gif(tmp_path / "mine.gif", 9))
    run = str(runs / "ebt")
    report = _rollout_json(capsys, run, "--video", video, "--context", "3", "--frames", "4")
    assert report["split"] == "file" and report["source"] == video
    assert report["clips"] == 3 and report["frames"] == 4  # starts 0, 2 or 3, 5
    report = _rollout_json(capsys, run, "--video", video, "--context", "3", "--frames", "8")
    assert report["frames"] == 6 and "rolling out 6 instead of 8" in report["stderr"]
    report = _rollout_json(capsys, run, "--video", "skimage-gif", "--context", "3")
    assert report["clips"] == 8 and report["frames"] == 12


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--video", "{tmp}/short.gif", "--context", "3"], "has 3 frames; --context 3 needs"),
        (["--video", "{tmp}/broken.gif", "--context", "2"], "cannot read video"),
        (["--video", "{tmp}/missing.mp4", "--context", "2"], "cannot read"),
        (["--context", "4"], "reads at most 3 context frames"),
        (["--ood", "--video", "{tmp}/short.gif"], "does not combine with --video"),
        (["--compare", "{tmp}/nothing"], "nothing"),
        (["--halt-tolerance", "0.1", "--accept-lower-energies"], "does not combine"),
        (["data.frame_size=16"], "does not match the checkpoint"),
    ],
)
def test_rollout_errors_are_one_line(runs, tmp_path, capsys, argv, message):
    _write_gif(tmp_path / "short.gif", 3)
    (tmp_path / "broken.gif").write_text("not a gif")
    argv = [item.format(tmp=tmp_path) for item in argv]
    capsys.readouterr()
    assert main(["rollout", str(runs / "ebt"), *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and error.startswith("ebt: error:")


def test_rollout_refuses_runs_of_other_modalities(tmp_path, capsys):
    train(image_config(tmp_path / "image", "tiny.toml", "train.batch_size=2"))
    capsys.readouterr()
    assert main(["rollout", str(tmp_path / "image")]) == 2
    error = capsys.readouterr().err
    assert "is an image run; ebt rollout needs a video run (image runs: ebt denoise)" in error


def test_rollout_of_a_vae_run_decodes_its_frames(tmp_path, capsys, restore_threads):
    """A run on frozen-VAE latents (a small random AutoencoderKL saved to tmp: no download):
    rolled out in latent space, scored and drawn on the decoded frames."""
    write_tiny_vae(tmp_path / "vae", blocks=2, size=8)  # downsampling 2: latents 4 x 4 x 4
    encoder = ["data.frame_encoder=vae", f"data.vae={tmp_path / 'vae'}", "data.frame_dim=64"]
    train(
        video_config(
            tmp_path / "run", "frame-tiny.toml", *encoder, f"data.cache_dir={tmp_path / 'cache'}"
        )
    )
    argv = [str(tmp_path / "run"), "--context", "2", "--frames", "2", "--clips", "2"]
    report = _rollout_json(capsys, *argv, "--strip", str(tmp_path / "strip.png"))
    assert report["models"]["ebt"]["psnr"] > 0 and (tmp_path / "strip.png").stat().st_size > 0
