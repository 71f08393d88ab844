"""Denoising with trained image runs: thinking curves, self-verification, adaptive halting
(photographs of any size: ebt.modalities.image.tiling).

Curves (`denoising_curves`): at every noise level the evaluation crops are noised once with
seeded noise (the same standard normal draw at every level, scaled by the level's schedule), and
every method sees exactly those images. The EBT thinks `steps` x `samples` ways: best-of-N starts
from the noisy image and N - 1 copies of it plus Gaussian perturbations of standard deviation
`perturbation` (in the [-1, 1] pixel scale), keeping per image the candidate of lowest final
energy; adaptive halting stops each image once its energy moves less than `tolerance` between
steps (the step that saw the small move is discarded). A DiT denoises by DDIM from the level's
timestep; the classical anchors are in ebt.modalities.image.classical. Per method: the paper's
PSNR (of each batch's mean 0-255 MSE, averaged over batches weighted by their images, as
`ebt eval`), the MSE, energy evaluations per image, seconds, and for the EBT the Pearson and
Spearman correlation of each image's final energy with its MSE (is a high energy a warning?).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ebt.api import LoadedRun
from ebt.config import ConfigError
from ebt.data import iter_eval_batches
from ebt.modalities.image.classical import METHODS, denoise_batch
from ebt.modalities.image.diffusion import GaussianDiffusion
from ebt.modalities.image.task import ImageModality, pixel_mse, psnr
from ebt.models.dit import DiT
from ebt.models.image_energy import NoContext
from ebt.plots import pyplot, save_figure
from ebt.thinking.halting import halt, shared_context
from ebt.thinking.loop import InferenceOptions, step_options, step_schedule
from ebt.thinking.selection import Thought, final_energies, self_verify


@dataclass
class ImageVerdict:
    """Denoised images (B, C, H, W), their final energies (B,) (EBT), energy evaluations per
    image, and the steps each image took (B,) (adaptive halting)."""

    images: torch.Tensor
    energies: torch.Tensor | None = None
    forward_passes: float | None = None
    steps: torch.Tensor | None = None


@dataclass
class DenoiseOptions:
    """The thinking knobs of `ebt denoise` beyond the number of steps and samples."""

    thinking: InferenceOptions = dataclasses.field(default_factory=InferenceOptions)
    perturbation: float = 0.05  # std of the extra best-of-N starts' offsets ([-1, 1] scale)
    tolerance: float | None = None  # adaptive halting: stop when |dE| < tolerance


Denoiser = Callable[[torch.Tensor], ImageVerdict]


def think_images(
    model: torch.nn.Module,
    noisy: torch.Tensor,
    steps: int | None,
    samples: int,
    opts: DenoiseOptions,
) -> ImageVerdict:
    """Best-of-`samples` thinking from noisy images (B, C, H, W), `steps` per landscape each
    (None: the trained number); see the module docstring."""
    starts = noisy.expand(samples, *noisy.shape).clone()  # (N, B, C, H, W)
    starts[1:] += opts.perturbation * torch.randn_like(starts[1:])  # sample 0: the noisy image
    trajectory = model.think(starts.flatten(0, 1), steps=steps, **opts.thinking.think_arguments())
    evaluations = len(trajectory.states) * opts.thinking.evaluations_per_step
    thought = Thought(trajectory.states[-1], evaluations)  # (N B, C, H, W)
    layout = (samples, len(noisy))  # (N, B)
    chosen = self_verify(model, thought, NoContext(), None, None, layout, dim=0)
    return ImageVerdict(chosen.states, chosen.energies, chosen.passes)  # (B, C, H, W), (B,)


def halt_images(
    model: torch.nn.Module, noisy: torch.Tensor, steps: int | None, opts: DenoiseOptions
) -> ImageVerdict:
    """Adaptive halting from noisy images (B, C, H, W), at most `steps` steps per
    landscape per image (None: the trained number)."""
    thinking, steps = opts.thinking, steps or model.args.inference_steps
    options = step_options(model, thinking.step_size, thinking.langevin_noise)
    context = shared_context(model, {0: NoContext()}, None)
    schedule = step_schedule(model.args.landscapes, steps)
    halted = halt(model, noisy.clone(), schedule, options, context, opts.tolerance, dim=0)
    energies = final_energies(model, NoContext(), halted.state)  # (B,)
    passes = float(halted.evaluations.mean())
    return ImageVerdict(halted.state, energies, passes, halted.steps)  # (B, C, H, W)


def make_denoiser(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    timestep: int,
    steps: int | None = 1,
    samples: int = 1,
    opts: DenoiseOptions | None = None,
) -> Denoiser:
    """noisy (B, C, H, W) -> ImageVerdict: DDIM from `timestep` for a DiT (timestep + 1
    evaluations), else EBT thinking (adaptive when opts.tolerance is set)."""
    opts = opts or DenoiseOptions()
    if isinstance(model, DiT):
        passes = float(timestep + 1)
        return lambda noisy: ImageVerdict(diffusion.ddim(model, noisy, timestep), None, passes)
    if opts.tolerance is not None:
        return lambda noisy: halt_images(model, noisy, steps, opts)
    return lambda noisy: think_images(model, noisy, steps, samples, opts)


def noise_batches(
    clean: list[torch.Tensor], diffusion: GaussianDiffusion, level: float, seed: int
) -> list[torch.Tensor]:
    """Each clean batch (B, C, H, W) noised at `level`, the noise drawn from a generator seeded
    with `seed` (with the run's train.seed, level 0.1 sees exactly `ebt eval`'s noise)."""
    generator = torch.Generator().manual_seed(seed)
    timestep, noisy = diffusion.timestep_for_level(level), []
    for batch in clean:
        noise = torch.randn(batch.shape, generator=generator).to(batch.device)  # (B, C, H, W)
        t = torch.full((batch.shape[0],), timestep, device=batch.device)  # (B,)
        noisy.append(diffusion.q_sample(batch, t, noise))  # (B, C, H, W)
    return noisy


def batch_psnr(errors: torch.Tensor) -> float:
    """The paper's PSNR of a batch: of the mean of its per-image 0-255 MSEs (B,)."""
    return 10 * math.log10(255.0**2 / max(float(errors.mean()), 1e-12))


def _correlations(energies: torch.Tensor, errors: torch.Tensor) -> dict[str, float | None]:
    """Pearson and Spearman correlation of final energies (n,) with per-image MSEs (n,)."""
    from scipy.stats import rankdata

    def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
        value = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else math.nan
        return None if math.isnan(value) else value

    a, b = energies.double().cpu().numpy(), errors.double().cpu().numpy()
    return {
        "energy_mse_pearson": pearson(a, b),
        "energy_mse_spearman": pearson(rankdata(a), rankdata(b)),
    }


def measure(
    denoise: Denoiser, clean: list[torch.Tensor], noisy: list[torch.Tensor], bar: Any = None
) -> tuple[dict[str, Any], torch.Tensor]:
    """Run `denoise` on every noisy batch; returns (its point: psnr, mse, forward_passes,
    seconds, and where the denoiser gives them energy correlations and steps taken; every
    denoised image (n, C, H, W))."""
    started, weighted, outputs, errors, energies, steps = time.perf_counter(), 0.0, [], [], [], []
    passes: float | None = None
    for target, batch in zip(clean, noisy, strict=True):
        verdict = denoise(batch)
        errors.append(pixel_mse(verdict.images, target))  # (B,)
        weighted += batch_psnr(errors[-1]) * len(target)
        outputs.append(verdict.images.detach().cpu())
        energies += [] if verdict.energies is None else [verdict.energies]
        steps += [] if verdict.steps is None else [verdict.steps]
        if verdict.forward_passes is not None:  # images-weighted mean over batches
            passes = (passes or 0.0) + verdict.forward_passes * len(target)
        if bar is not None:
            bar.update()
    error = torch.cat(errors)  # (n,)
    point: dict[str, Any] = {"psnr": weighted / len(error), "mse": float(error.mean())}
    passes = None if passes is None else passes / len(error)
    point |= {"forward_passes": passes, "seconds": time.perf_counter() - started}
    if energies:
        point |= _correlations(torch.cat(energies), error)
    if steps:
        taken = torch.cat(steps)  # (n,)
        counts = {str(k): int((taken == k).sum()) for k in taken.unique().tolist()}
        point["steps_taken"] = {"mean": float(taken.float().mean()), "counts": counts}
    return point, torch.cat(outputs)


@dataclass
class CurveSpec:
    """What `denoising_curves` measures."""

    levels: list[float]
    steps: list[int]
    samples: list[int]
    options: DenoiseOptions
    seed: int = 0
    classical: bool = False
    showcase: int = 4  # crops per level kept for the grid


Gallery = dict[str, torch.Tensor]  # column name -> crops (k, C, H, W)


def _ebt_points(model, diffusion, timestep, clean, noisy, spec, bar) -> tuple[list, str, Any]:
    """Every (steps, samples) point, then the adaptive ones; returns (points, a label of the
    point with the highest PSNR, its denoised images)."""
    runs = [(steps, samples, None) for steps in spec.steps for samples in spec.samples]
    if spec.options.tolerance is not None:
        runs += [(steps, 1, spec.options.tolerance) for steps in spec.steps]
    points, best, best_images, label = [], -math.inf, clean[0], ""
    for steps, samples, tolerance in runs:
        torch.manual_seed(spec.seed)  # perturbations and Langevin noise: the same every run
        opts = dataclasses.replace(spec.options, tolerance=tolerance)
        denoise = make_denoiser(model, diffusion, timestep, steps, samples, opts)
        point, images = measure(denoise, clean, noisy, bar)
        head = {"steps": steps, "samples": samples}
        if tolerance is not None:
            head |= {"adaptive": True, "tolerance": tolerance}
        points.append(head | point)
        if point["psnr"] > best:
            best, best_images = point["psnr"], images
            plural = "s" if steps > 1 else ""
            label = f"EBT: {steps} step{plural}, best of {samples}"
            label = f"EBT: adaptive, <= {steps} step{plural}" if tolerance else label
    return points, label, best_images


def _classical(method: str, scale: float, noisy: torch.Tensor) -> ImageVerdict:
    """A classical denoiser as a Denoiser (no model evaluations)."""
    return ImageVerdict(denoise_batch(method, noisy, scale))


def _classical_points(diffusion, timestep, clean, noisy, bar) -> tuple[dict, Gallery]:
    """The scikit-image anchors on the noisy images (the signal's sqrt(alpha_bar) undone)."""
    scale = float(diffusion.tables["sqrt_ab"][timestep])
    points, gallery = {}, {}
    for method in METHODS:
        denoise = functools.partial(_classical, method, scale)
        points[method], gallery[method] = measure(denoise, clean, noisy, bar)
    return points, gallery


def _level(model, diffusion, clean, level, spec, dit, bar) -> tuple[dict, str, Gallery]:
    """One noise level: the noisy input, the EBT points, the DiT and the classical anchors;
    returns (its JSON entry, a row label for the grid, a few crops per method)."""
    timestep = diffusion.timestep_for_level(level)
    noisy = noise_batches(clean, diffusion, level, spec.seed)
    noisy_point, noisy_images = measure(ImageVerdict, clean, noisy)  # the identity
    entry = {"noise_level": level, "timestep": timestep, "images": len(noisy_images)}
    entry["noisy"] = {key: noisy_point[key] for key in ("psnr", "mse")}
    gallery, label = {"clean": torch.cat(clean).cpu(), "noisy": noisy_images}, f"noise {level:g}"
    if not isinstance(model, DiT):
        points = _ebt_points(model, diffusion, timestep, clean, noisy, spec, bar)
        entry["ebt"], best, gallery["EBT (best)"] = points
        label += f"\n{best}"
    if dit is not None:
        denoise = make_denoiser(dit, diffusion, timestep)
        entry["dit"], gallery["DiT"] = measure(denoise, clean, noisy, bar)
    if spec.classical:
        entry["classical"], anchors = _classical_points(diffusion, timestep, clean, noisy, bar)
        gallery |= anchors
    order = gallery["clean"].flatten(1).std(dim=1).argsort(descending=True)  # (n,)
    top = order[: max(1, len(order) * 3 // 4)]  # textured crops, evenly spaced among them
    show = top[torch.linspace(0, len(top) - 1, min(spec.showcase, len(top))).round().long()]
    return entry, label, {name: images[show] for name, images in gallery.items()}


def denoising_curves(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    clean: list[torch.Tensor],
    spec: CurveSpec,
    dit: torch.nn.Module | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[tuple[str, Gallery]]]:
    """Denoising curves over noise levels x steps x samples of an image EBT (or a DiT run
    alone: `model` a DiT), with a DiT to compare and classical anchors; see the module
    docstring. Returns (the JSON-ready result, per level a gallery of a few crops per method
    for `write_grid`). The caller's RNG state is left as it was."""
    dit = model if isinstance(model, DiT) else dit
    per_level = 0 if isinstance(model, DiT) else len(spec.steps) * len(spec.samples)
    per_level += len(spec.steps) if spec.options.tolerance is not None and per_level else 0
    per_level += (dit is not None) + (len(METHODS) if spec.classical else 0)
    total = per_level * len(spec.levels) * len(clean)
    bar = tqdm(total=total, desc="denoise", file=sys.stderr, delay=2, disable=not progress)
    levels, galleries = [], []
    with torch.random.fork_rng(devices=[]), bar:
        for level in spec.levels:
            entry, label, gallery = _level(model, diffusion, clean, level, spec, dit, bar)
            levels.append(entry)
            galleries.append((label, gallery))
    options = vars(spec.options.thinking) | {"perturbation": spec.options.perturbation}
    options["halt_tolerance"] = spec.options.tolerance
    result = {"images": sum(len(batch) for batch in clean), "seed": spec.seed}
    return result | {"options": options, "levels": levels}, galleries


def write_grid(galleries: list[tuple[str, Gallery]], path: str | Path) -> Path:
    """A PNG of a few crops per noise level (galleries: (row label, crops per method)): one
    row per crop, one column per method, each labelled with its PSNR against the clean crop."""
    plt = pyplot()

    names = list(galleries[0][1])
    rows = [(label, g, i) for label, g in galleries for i in range(len(g["clean"]))]
    figure, axes = plt.subplots(
        len(rows), len(names), figsize=(1.5 * len(names), 1.6 * len(rows)), squeeze=False
    )
    for r, (label, gallery, index) in enumerate(rows):
        clean = gallery["clean"][index : index + 1]  # (1, C, H, W)
        for c, name in enumerate(names):
            image = gallery[name][index : index + 1]  # (1, C, H, W)
            axis = axes[r, c]
            axis.imshow(((image[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            quality = "" if name == "clean" else f"{float(psnr(image, clean)[0]):.1f} dB"
            axis.set_xlabel(quality, fontsize=7)
            if r == 0:
                axis.set_title(name, fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


def check_compare(dit: LoadedRun, run: LoadedRun, path: str) -> None:
    """`--compare path` (an image run, see `ebt.load_run(..., modality="image")`) must be a DiT
    whose noise schedule and crop size match `run`'s, an EBT run (ConfigError, one line)."""
    if not isinstance(dit.model, DiT):
        kind = dit.config.model.kind
        raise ConfigError(f"--compare {path}: a model.kind={kind} run; --compare needs a DiT run")
    if isinstance(run.model, DiT):
        raise ConfigError("--compare: RUN is a DiT run itself; give the EBT run as RUN")
    ours, theirs = run.config.data, dit.config.data
    steps = (run_diffusion(run).steps, run_diffusion(dit).steps)
    if steps[0] != steps[1] or ours.image_size != theirs.image_size:
        raise ConfigError(
            f"--compare {path}: its schedule ({steps[1]} steps) and crops ({theirs.image_size}) "
            f"must match the run's ({steps[0]} steps, {ours.image_size})"
        )


def run_diffusion(run: LoadedRun) -> GaussianDiffusion:
    """The noise schedule an image run was trained with."""
    return ImageModality(run.config).diffusion


def check_levels(diffusion: GaussianDiffusion, levels: list[float]) -> None:
    """Every level must name a timestep of the schedule (ConfigError otherwise)."""
    for level in levels:
        if diffusion.timestep_for_level(level) < 0:
            smallest = 1 / diffusion.steps
            raise ConfigError(f"noise level {level:g}: below this run's smallest, {smallest:g}")


def eval_crops(run: LoadedRun, split: str, batches: int = 0) -> list[torch.Tensor]:
    """The fixed evaluation crops of `split` in batches (B, C, S, S) of train.batch_size;
    batches 0: train.eval_batches of them."""
    dataset = ImageModality(run.config).dataset(split)
    train = run.config.train
    device = next(run.model.parameters()).device
    crops = iter_eval_batches(dataset, train.batch_size, batches or train.eval_batches)
    return [batch.to(device) for batch in crops]
