"""The video EBT's verification signal in a rollout: the final energy of every predicted frame and
(patch tokens) of every patch, and how well it ranks the frames' and patches' errors (Pearson and
Spearman correlations), plus the per-patch energy as a heat-map row for the strip picture."""

from __future__ import annotations

import math

import torch

from ebt.models.patch_frames import patchify


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a flat tensor (ties broken by position; float data has almost none)."""
    order = values.argsort()
    result = torch.empty_like(order)
    result[order] = torch.arange(values.numel(), device=values.device)
    return result.double()


def correlation(first: torch.Tensor, second: torch.Tensor) -> float | None:
    """Pearson correlation of two equally sized tensors (None when undefined, e.g. constant)."""
    if first.numel() < 2:
        return None
    pairs = torch.stack((first.double().flatten(), second.double().flatten()))
    value = float(torch.corrcoef(pairs)[0, 1])
    return value if math.isfinite(value) else None


def spearman(first: torch.Tensor, second: torch.Tensor) -> float | None:
    """Spearman's rank correlation: the Pearson correlation of the ranks."""
    if first.numel() < 2:
        return None
    return correlation(ranks(first.flatten()), ranks(second.flatten()))


def patch_errors(images: torch.Tensor, real: torch.Tensor, patches: int) -> torch.Tensor:
    """Mean squared error (0-255 scale) of every patch (B, H, P) of frames (B, H, 3, S, S) in
    [-1, 1] against the true ones, for P patches a frame."""
    side = images.shape[-1]
    patch = side // math.isqrt(patches)
    squared = ((images.clamp(-1, 1) - real).double() * 127.5).square().flatten(2)  # (B, H, F)
    return patchify(squared, side, patch).mean(-1)  # (B, H, P)


def within_horizon_spearman(energies: torch.Tensor, errors: torch.Tensor) -> dict:
    """Spearman of energies with errors (B, H) among the clips at each horizon, and its mean:
    whether the energy flags the worse frames of the same horizon, whatever it does with the
    horizon itself (later frames are worse, and may have lower energy as they blur)."""
    per_horizon = [spearman(energies[:, h], errors[:, h]) for h in range(energies.shape[1])]
    defined = [value for value in per_horizon if value is not None]
    mean = sum(defined) / len(defined) if defined else None
    return {
        "energy_error_spearman_per_horizon": per_horizon,
        "energy_error_spearman_within_horizon": mean,
    }


def energy_summary(
    energies: torch.Tensor,
    steps: torch.Tensor,
    errors: torch.Tensor,
    patch_energies: torch.Tensor | None = None,
    errors_per_patch: torch.Tensor | None = None,
) -> dict:
    """Mean final energy and thinking steps per horizon of energies / steps (B, H), and the
    correlations of a frame's energy with its error (B, H) (e.g. MSE), over all frames and
    within each horizon (within_horizon_spearman); with patch_energies and
    errors_per_patch (B, H, P), the mean energy per patch and their rank correlation too."""
    summary = {
        "energy": [round(float(v), 6) for v in energies.double().mean(0)],
        "steps": [round(float(v), 4) for v in steps.double().mean(0)],
        "energy_error_correlation": correlation(energies, errors),
        "energy_error_spearman": spearman(energies, errors),
        **within_horizon_spearman(energies, errors),
    }
    if patch_energies is not None and errors_per_patch is not None:
        mean = patch_energies.double().mean((0, 1))  # (P,)
        summary["patch_energy"] = [round(float(v), 6) for v in mean]
        summary["patch_energy_error_spearman"] = spearman(patch_energies, errors_per_patch)
    return summary


def heat_row(patch_energies: torch.Tensor, context: int, side: int) -> torch.Tensor:
    """A strip row (context + H, 3, side, side) in [-1, 1]: blank (white) context frames, then
    each predicted frame's patch energies (H, P) as a heat map (viridis, min to max over the row,
    nearest-neighbour upscaled to the frame's size)."""
    from matplotlib import colormaps

    horizon, count = patch_energies.shape
    grid = math.isqrt(count)
    values = patch_energies.double()
    scaled = (values - values.min()) / (values.max() - values.min()).clamp(min=1e-12)
    colours = torch.from_numpy(colormaps["viridis"](scaled.numpy())[..., :3])  # (H, P, 3)
    colours = colours.view(horizon, grid, grid, 3).permute(0, 3, 1, 2)  # (H, 3, g, g)
    repeat = side // grid
    maps = colours.repeat_interleave(repeat, dim=2).repeat_interleave(repeat, dim=3)
    blank = torch.ones(context, 3, side, side, dtype=maps.dtype)
    return (torch.cat((blank, maps)) * 2 - 1).float()  # (context + H, 3, S, S)
