"""Patch-token video models (model.frame_tokens = "patches"): patch layout, block-causal
attention (no information from later frames), split streams against one concatenated pass, the
candidate gradient against float64 autograd and finite differences, best-of-N groups kept
apart, the Transformer++ twin, the KV-cache rollout and the config checks."""

from __future__ import annotations

import re

import pytest
import torch
from support import CONFIGS
from support.vision import (
    PATCH,
    PATCH_BATCH,
    PATCH_FRAME_DIM,
    PATCH_FRAMES,
    PATCH_SIZE,
    PATCHES,
    patch_config,
    patch_frames,
    patch_model,
)

from ebt.config import config_from_dict, load_config
from ebt.errors import ConfigError
from ebt.modalities.video.rollout import predictor_for, rollout
from ebt.modalities.video.thinking import FrameThinking
from ebt.models import build_model
from ebt.models.patch_frames import (
    PatchFrameEnergyTransformer,
    PatchFrameTransformerPP,
    block_causal,
    context_block,
    patchify,
    unpatchify,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE, FRAMES, BATCH = PATCH_SIZE, PATCH_FRAMES, PATCH_BATCH
FRAME_DIM, frames = PATCH_FRAME_DIM, patch_frames
VARIANTS = ("time_embed", "adaln", "default", "pred_step")


def test_patchify_is_raster_order_channel_major_and_inverts():
    x = frames(3)
    patches = patchify(x, SIZE, PATCH)  # (B, T, P, 12)
    image = x.view(BATCH, 3, 3, SIZE, SIZE)
    assert patches.shape == (BATCH, 3, PATCHES, 3 * PATCH * PATCH)
    assert torch.equal(patches[1, 2, 1], image[1, 2, :, 0:2, 2:4].flatten())
    assert torch.equal(patches[0, 1, 2], image[0, 1, :, 2:4, 0:2].flatten())
    assert torch.equal(unpatchify(patches, SIZE, PATCH), x)


def test_builders_pick_the_patch_models_and_the_one_token_mode_stays_the_default():
    assert isinstance(patch_model(), PatchFrameEnergyTransformer)
    assert isinstance(patch_model(kind="transformer_pp"), PatchFrameTransformerPP)
    config = patch_config()
    config.model.frame_tokens = "frame"
    assert type(build_model(config)).__name__ == "EnergyTransformer"


def test_block_causal_mask_sees_own_and_earlier_frames_only():
    allowed = block_causal(torch.arange(7), 7, prefix=1, per_frame=2)  # step token + 3 frames
    assert allowed[0].tolist() == [True] + [False] * 6
    assert allowed[3].tolist() == [True, True, True, True, True, False, False]  # frame 1
    assert allowed[6].all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_information_from_later_frames(variant):
    """Perturbing real frame 3 leaves the energies of candidates 0..2 (and their gradients)
    unchanged and changes candidate 3's."""
    model = patch_model(variant)
    context, candidates = frames(FRAMES - 1), frames(FRAMES - 1, seed=1)
    changed = context.clone()
    changed[:, 3] += 0.5
    for landscape in range(2):
        before = model.energies_and_gradient(model.encode_context(context, landscape), candidates)
        after = model.energies_and_gradient(model.encode_context(changed, landscape), candidates)
        torch.testing.assert_close(before[0][:, :3], after[0][:, :3], rtol=0, atol=1e-12)
        torch.testing.assert_close(before[1][:, :3], after[1][:, :3], rtol=0, atol=1e-12)
        assert (before[0][:, 3] - after[0][:, 3]).abs().min() > 1e-6


def test_candidates_of_one_frame_do_not_see_other_candidate_frames():
    """A candidate frame's energy does not depend on the other candidate frames: changing
    candidate 1 changes only energy 1 (the own-group mask)."""
    model = patch_model()
    cache = model.encode_context(frames(FRAMES - 1), 0)
    candidates = frames(FRAMES - 1, seed=1)
    changed = candidates.clone()
    changed[:, 1] -= 0.3
    before, after = model.energies(cache, candidates), model.energies(cache, changed)
    torch.testing.assert_close(before[:, [0, 2, 3]], after[:, [0, 2, 3]], rtol=0, atol=1e-12)
    assert (before[:, 1] - after[:, 1]).abs().min() > 1e-6


def naive_patch_energies(model, context, candidate, row, landscape):
    """One concatenated pass: [step token] + real frames 0..row + the candidate frame as frame
    row + 1, block-causal self-attention through every block; the candidate's patch energies."""
    x = torch.cat((context[:, : row + 1], candidate.unsqueeze(1)), dim=1)  # (B, row + 2, F)
    tokens = model.patches(x)  # (B, (row + 2) P, D)
    if model.variant == "pred_step":  # the step embedding conditions the candidate only
        tokens[:, -PATCHES:] += model.step_embedding.weight[landscape]
    condition = None
    if model.step_embedding is not None:
        condition = model.step_embedding.weight[landscape].expand(BATCH, -1)  # (B, D)
    if model.variant == "time_embed":
        tokens = torch.cat((condition.unsqueeze(1), tokens), dim=1)
    adaln = condition if model.variant == "adaln" else None
    positions = torch.arange(tokens.shape[1])
    rope = model._rope(positions).unsqueeze(1)
    allowed = block_causal(positions, tokens.shape[1], model.prefix, PATCHES)
    for block in model.blocks:
        tokens = context_block(block, tokens, rope, adaln, allowed)[0]
    z = model.norm(tokens[:, -PATCHES:])
    if model.final_modulation is not None:
        shift, scale = model.final_modulation(adaln).chunk(2, dim=-1)
        z = z * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return model.energy_head(z).squeeze(-1)  # (B, P)


@pytest.mark.parametrize("variant", VARIANTS)
def test_split_streams_equal_one_concatenated_pass(variant):
    model = patch_model(variant)
    context, candidates = frames(FRAMES - 1), frames(FRAMES - 1, seed=1)
    with torch.no_grad():
        for landscape in range(2):
            split = model.patch_energies(model.encode_context(context, landscape), candidates)
            for row in range(FRAMES - 1):
                naive = naive_patch_energies(model, context, candidates[:, row], row, landscape)
                torch.testing.assert_close(split[:, row], naive, rtol=1e-10, atol=1e-10)


def test_candidate_gradient_matches_float64_autograd_and_finite_differences():
    model = patch_model("time_embed")
    context, candidates = frames(FRAMES - 1), frames(FRAMES - 1, seed=1)
    single = patch_model("time_embed").float()
    cache32 = single.encode_context(context.float(), 1)
    energies32, gradient32 = single.energies_and_gradient(cache32, candidates.float())
    cache = model.encode_context(context, 1)
    x = candidates.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(model.energies(cache, x).sum(), x)
    torch.testing.assert_close(gradient32.double(), gradient, rtol=1e-4, atol=1e-5)
    expected = model.energies(cache, candidates)
    torch.testing.assert_close(energies32.double(), expected, rtol=1e-4, atol=1e-5)
    small = candidates[:1, :2].clone().requires_grad_()
    rows = torch.tensor([0, 2])
    cache0 = model.encode_context(context[:1], 1)
    assert torch.autograd.gradcheck(lambda y: model.energies(cache0, y, rows), (small,))


def test_best_of_n_starts_of_one_row_are_independent():
    """rows repeated (one context row per best-of-N start): each start's energy equals its
    energy alone."""
    model = patch_model()
    cache = model.encode_context(frames(FRAMES - 1), 0)
    starts = frames(3, seed=2)
    rows = torch.full((3,), 2)
    together = model.energies(cache, starts, rows)
    for index in range(3):
        alone = model.energies(cache, starts[:, index : index + 1], rows[:1])
        torch.testing.assert_close(together[:, index : index + 1], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("variant", "tolerance"), [("time_embed", None), ("adaln", None), ("time_embed", 1e-3)]
)
def test_patch_rollout_cached_equals_recompute(variant, tolerance):
    """Best-of-3 with Langevin noise (and adaptive halting), 7 frames after 3: the window of 4
    frames overflows, so the cache is rebuilt as well as extended frame block by frame block."""
    model = patch_model(variant, noise=0.05)
    thinking = FrameThinking(
        steps=2, samples=3, perturbation=0.2, init="last_frame", halt_tolerance=tolerance
    )
    results = {}
    for cached in (True, False):
        torch.manual_seed(1)
        results[cached] = rollout(predictor_for(model, thinking, cached=cached), frames(3), 7)
    torch.testing.assert_close(results[True].frames, results[False].frames, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results[True].energies, results[False].energies)
    assert torch.equal(results[True].steps, results[False].steps)
    assert results[True].frames.shape == (BATCH, 7, FRAME_DIM)


def test_transformer_twin_is_block_causal_residual_and_caches():
    model = patch_model(kind="transformer_pp", frame_residual=True)
    context = frames(FRAMES - 1)
    changed = context.clone()
    changed[:, 2] += 0.5
    with torch.no_grad():
        out, later = model(context), model(changed)
        torch.testing.assert_close(out[:, :2], later[:, :2], rtol=0, atol=1e-12)
        assert (out[:, 2] - later[:, 2]).abs().max() > 1e-6
        plain = patch_model(kind="transformer_pp")
        torch.testing.assert_close(out - context, plain(context))  # same weights, + last frame
    results = {}
    for cached in (True, False):
        results[cached] = rollout(predictor_for(model, FrameThinking(), cached=cached), context, 6)
    torch.testing.assert_close(results[True].frames, results[False].frames, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"patch_size": 3}, "not a multiple of model.patch_size=3"),
        ({"dim": 8, "heads": 2}, "exceed model.dim=8"),
        ({"frame_residual": True}, "frame_residual is the Transformer++'s"),
    ],
)
def test_patch_config_checks(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        patch_config(**overrides)


def test_patch_tokens_are_for_pixel_video_only():
    with pytest.raises(ConfigError, match="needs pixel frames"):
        config_from_dict(
            {
                "model": {"modality": "video", "frame_tokens": "patches", "patch_size": 2},
                "data": {"frame_encoder": "vae", "frame_size": 16},
            }
        )
    with pytest.raises(ConfigError, match="frame_residual is for"):
        config_from_dict({"model": {"modality": "video", "frame_residual": True}})


def test_the_tiny_presets_are_patch_twins_matched_in_parameters():
    root = CONFIGS / "video"
    ebt = build_model(load_config(root / "tiny.toml"))
    twin = build_model(load_config(root / "baseline-tiny.toml"))
    assert isinstance(ebt, PatchFrameEnergyTransformer) and ebt.args.patch_size == 4
    assert isinstance(twin, PatchFrameTransformerPP) and twin.args.frame_residual
    assert load_config(root / "tiny.toml").think.init == "last_frame"
    counts = [sum(p.numel() for p in model.parameters()) for model in (ebt, twin)]
    assert abs(counts[0] - counts[1]) / counts[0] < 0.02, counts


def test_the_gpu_preset_builds_a_patch_ebt_and_its_twin_matches_it():
    """configs/video/gpu.toml (never run here) loads and builds; the twin its comment names
    has the same parameter count within 1%."""
    path = CONFIGS / "video" / "gpu.toml"
    ebt = build_model(load_config(path))
    twin_keys = ["model.kind=transformer_pp", "model.frame_residual=true", "model.ffn_dim=360"]
    twin = build_model(load_config(path, twin_keys))
    assert isinstance(ebt, PatchFrameEnergyTransformer)
    assert isinstance(twin, PatchFrameTransformerPP)
    counts = [sum(p.numel() for p in model.parameters()) for model in (ebt, twin)]
    assert abs(counts[0] - counts[1]) / counts[0] < 0.01, counts


def test_thinking_reaches_every_pixel_with_patches_but_not_with_one_token():
    """The reason for patch tokens: dE/dx over many candidate frames spans all of frame space
    (48 numbers) with patch tokens, but only the width (16) with one token per frame."""
    context = frames(FRAMES - 1)
    candidates = torch.rand(64, 1, FRAME_DIM, dtype=torch.float64) * 2 - 1
    rows = torch.zeros(64, dtype=torch.long)
    ranks = {}
    for tokens in ("patches", "frame"):
        config = patch_config()
        config.model.frame_tokens = tokens
        torch.manual_seed(0)
        model = build_model(config).double().eval()
        cache = model.encode_context(context[:1], 1)
        starts = candidates.transpose(0, 1)  # (1, 64, F): 64 candidates after real frame 0
        _, gradient = model.energies_and_gradient(cache, starts, rows)
        ranks[tokens] = int(torch.linalg.matrix_rank(gradient[0]))  # of (64, F)
    assert ranks == {"patches": FRAME_DIM, "frame": 16}
