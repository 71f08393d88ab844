"""Verification in patch-token rollouts: the final energy per patch (summing to the frame's),
its rank correlations with the errors in the report, and the heat-map row of the strip."""

from __future__ import annotations

import json

import imageio.v3 as iio
import pytest
import torch
from support.vision import (
    PATCH_BATCH,
    PATCH_FRAME_DIM,
    PATCHES,
    patch_frames,
    patch_model,
    video_config,
)

from ebt.api import load_run
from ebt.cli.main import main
from ebt.modalities.video.rollout import predictor_for, rollout
from ebt.modalities.video.rollout_report import RolloutRequest, first_clip_rows, run_rollouts
from ebt.modalities.video.thinking import (
    FrameThinking,
    initial_frames,
    start_kind,
    think_next_frame,
)
from ebt.modalities.video.verification import (
    heat_row,
    patch_errors,
    spearman,
    within_horizon_spearman,
)
from ebt.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")
BATCH, FRAME_DIM, frames = PATCH_BATCH, PATCH_FRAME_DIM, patch_frames
PATCH_RUN = ["model.patch_size=2", "model.frame_tokens=patches"]


def test_spearman_is_the_rank_correlation():
    x = torch.tensor([0.1, 0.5, 0.2, 3.0, 1.0])
    assert spearman(x, x.exp() * 7) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)
    y = torch.tensor([1.0, 2.0, 3.0, 5.0, 4.0])  # ranks 0 2 1 4 3 against 0 1 2 4 3
    assert spearman(x, y) == pytest.approx(1 - 6 * (0 + 1 + 1 + 0 + 0) / (5 * 24))
    assert spearman(torch.ones(1), torch.ones(1)) is None


def test_within_horizon_spearman_ranks_clips_at_each_horizon_apart():
    errors = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])  # (B, H): later frames worse
    energies = torch.tensor([[-1.0, -9.0], [-0.5, -8.0], [0.0, -7.0]])  # lower as they blur
    assert spearman(energies, errors) < 0  # pooled, the horizon dominates
    within = within_horizon_spearman(energies, errors)
    assert within["energy_error_spearman_per_horizon"] == pytest.approx([1.0, 1.0])
    assert within["energy_error_spearman_within_horizon"] == pytest.approx(1.0)
    mixed = within_horizon_spearman(energies * torch.tensor([1.0, -1.0]), errors)
    assert mixed["energy_error_spearman_per_horizon"] == pytest.approx([1.0, -1.0])
    assert mixed["energy_error_spearman_within_horizon"] == pytest.approx(0.0)
    one_clip = within_horizon_spearman(energies[:1], errors[:1])
    assert one_clip["energy_error_spearman_within_horizon"] is None


def test_patch_errors_locate_the_wrong_patch():
    real = torch.zeros(1, 1, 3, 4, 4)
    images = real.clone()
    images[0, 0, :, 2:4, 0:2] = 1.0  # patch 2 (second row, first column) off by 127.5
    errors = patch_errors(images, real, PATCHES)
    assert errors.shape == (1, 1, PATCHES)
    assert errors[0, 0].tolist() == [0.0, 0.0, 127.5**2, 0.0]


def test_rollout_reports_patch_energies_that_sum_to_the_frames():
    model = patch_model(noise=0.0)
    thinking = FrameThinking(steps=2, samples=3, perturbation=0.2, init="last_frame")
    torch.manual_seed(0)
    result = rollout(predictor_for(model, thinking), frames(3), 4)
    assert result.patch_energies.shape == (BATCH, 4, PATCHES)
    torch.testing.assert_close(result.patch_energies.sum(-1), result.energies)
    assert result.frames.shape == (BATCH, 4, FRAME_DIM)


def test_motion_starts_move_the_last_frame_by_fractions_of_the_last_change():
    model, context = patch_model(), frames(3)
    last, previous = context[:, -1], context[:, -2]  # (B, F)
    thinking = FrameThinking(samples=4, init="last_frame")
    assert start_kind(model, thinking) == "motion"
    starts = initial_frames(model, last, thinking, previous)  # (B, 4, F)
    for k in range(4):
        torch.testing.assert_close(starts[:, k], last + k / 4 * (last - previous))
    noise = FrameThinking(samples=4, init="last_frame", starts="noise", perturbation=0.3)
    torch.manual_seed(0)
    offsets = initial_frames(model, last, noise, previous)[:, 1:] - last[:, None]  # (B, 3, F)
    assert abs(float(offsets.pow(2).mean().sqrt()) - 0.3) < 0.05
    torch.manual_seed(0)
    alone = initial_frames(model, last, thinking)  # no previous frame: noise offsets
    torch.testing.assert_close(alone[:, 1:] - last[:, None], offsets / 3)
    assert start_kind(model, FrameThinking(samples=4)) == "noise"  # started from zeros


def test_the_rollout_thinks_from_motion_starts_of_its_own_last_two_frames():
    model, context = patch_model(), frames(3)
    thinking = FrameThinking(steps=2, samples=3, init="last_frame")
    chosen = rollout(predictor_for(model, thinking), context, 1).frames[:, 0]  # (B, F)
    caches = {s: model.encode_context(context, s) for s in range(model.args.landscapes)}
    starts = initial_frames(model, context[:, -1], thinking, context[:, -2])  # (B, 3, F)
    verdict = think_next_frame(model, caches, starts, context.shape[1] - 1, thinking)
    torch.testing.assert_close(chosen, verdict.frames, rtol=1e-10, atol=1e-10)
    assert not torch.equal(starts[:, 1], starts[:, 0])


def test_heat_row_is_blank_over_the_context_then_one_map_per_frame():
    energies = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])  # (H, P)
    row = heat_row(energies, context=2, side=4)
    assert row.shape == (4, 3, 4, 4)
    assert torch.equal(row[:2], torch.ones(2, 3, 4, 4))
    assert torch.equal(row[2, :, :2, :2], row[3, :, 2:, 2:])  # lowest energies, same colour
    assert not torch.equal(row[2, :, :2, :2], row[2, :, 2:, 2:])


def test_rollout_command_reports_patch_verification(tmp_path, capsys):
    train(video_config(tmp_path / "ebt", "tiny.toml", *PATCH_RUN))
    baseline = [*PATCH_RUN, "model.frame_residual=true"]
    train(video_config(tmp_path / "tpp", "baseline-tiny.toml", *baseline))
    strip = tmp_path / "strip.png"
    argv = ["rollout", str(tmp_path / "ebt"), "--compare", str(tmp_path / "tpp"), "--json"]
    argv += ["--context", "2", "--frames", "2", "--clips", "2", "--strip", str(strip)]
    capsys.readouterr()
    assert main(argv) == 0
    ebt = json.loads(capsys.readouterr().out)["models"]["ebt"]
    assert len(ebt["patch_energy"]) == (8 // 2) ** 2  # 8 x 8 frames of 2 x 2 patches
    assert len(ebt["energy_error_spearman_per_horizon"]) == 2
    assert {"energy_error_spearman", "patch_energy_error_spearman"} <= set(ebt)
    assert -1 <= ebt["patch_energy_error_spearman"] <= 1
    text = ["rollout", str(tmp_path / "ebt"), "--context", "2", "--frames", "2", "--clips", "2"]
    assert main(text) == 0
    printed = capsys.readouterr().out
    assert "ebt energy vs error (Spearman): per frame" in printed
    assert "(within a horizon " in printed
    assert iio.imread(strip).shape[0] > 0
    request = RolloutRequest(context=2, frames=2, clips=2)
    outcome = run_rollouts(request, {"run": load_run(tmp_path / "ebt")})
    rows = first_clip_rows(outcome, 2)
    assert list(rows) == ["truth", "ebt", "ebt energy", "copy_last"]
    expected = heat_row(outcome.rollouts["ebt"].patch_energies[0], 2, 8)
    assert torch.equal(rows["ebt energy"], expected)
