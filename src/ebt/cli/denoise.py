"""`ebt denoise`: denoising curves of an image run (steps, best-of-N, adaptive halting, a DiT
and classical anchors on the same crops), or a photograph of any size by tiles."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from ebt.cli.args import (
    COUNT,
    INT_0,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    STEPS_LIST,
    add_run_parser,
    add_thinking_options,
    checked,
    print_json,
    thinking_options,
)
from ebt.config import ConfigError
from ebt.outputs import IMAGE, PNG, Output, atomic_path, check_outputs

if TYPE_CHECKING:
    from ebt.modalities.image.tiling import PhotoRequest


def check_flags(args: argparse.Namespace) -> None:
    """Flag combinations and output paths `ebt denoise` refuses before anything loads (one
    line: ConfigError, OutputError)."""
    photo = {"--output": args.output, "--add-noise": args.add_noise}
    photo["--tile-stride"] = args.tile_stride
    curves = {"--compare": args.compare, "--classical": args.classical, "--grid": args.grid}
    if not args.input:
        used = [flag for flag, value in photo.items() if value]
        if used:
            raise ConfigError(f"{', '.join(used)}: only with --input PHOTO")
        check_outputs([Output("--grid", args.grid, PNG)])
        return
    if not args.output:
        raise ConfigError("--input needs --output FILE (where the denoised image goes)")
    used = [flag for flag, value in curves.items() if value]
    if used:
        raise ConfigError(f"{', '.join(used)}: only without --input (denoising curves)")
    for flag, values in (("--steps", args.steps), ("--samples", args.samples)):
        if values and len(values) > 1:
            raise ConfigError(f"{flag}: one value with --input, got {len(values)}")
    if args.halt_tolerance is not None and args.samples and args.samples[0] > 1:
        raise ConfigError("--halt-tolerance thinks one sample per tile: drop --samples")
    check_outputs([Output("--output", args.output, IMAGE)], inputs=[args.input])


def photo_request(args: argparse.Namespace) -> PhotoRequest:
    """The typed request of `ebt denoise --input` (one value of --steps / --samples)."""
    from ebt.modalities.image.tiling import PhotoRequest

    return PhotoRequest(
        input=args.input,
        output=args.output,
        add_noise=args.add_noise,
        level=args.noise_level[0] if args.noise_level else None,
        tile_stride=args.tile_stride,
        steps=args.steps[0] if args.steps else None,
        samples=args.samples[0] if args.samples else 1,
    )


def cmd_denoise(args: argparse.Namespace) -> int:
    from ebt.api import load_run
    from ebt.modalities.image import denoise as dn
    from ebt.modalities.image.tiling import photo_command, photo_summary

    options = dn.DenoiseOptions(thinking_options(args), args.perturbation, args.halt_tolerance)
    check_flags(args)  # invalid combinations and output paths fail before any loading
    run = load_run(args.run, args.overrides, modality="image", verb="ebt denoise")
    seed = run.config.train.seed if args.seed is None else args.seed
    if args.input:
        result = photo_command(run, photo_request(args), options, seed)
        print_json(result) if args.json else print(photo_summary(result))
        return 0
    dit = None
    if args.compare:
        dit = load_run(args.compare, modality="image", verb="ebt denoise --compare")
        dn.check_compare(dit, run, args.compare)
    data, diffusion = run.config.data, dn.run_diffusion(run)
    levels = args.noise_level or [data.noise_level, data.ood_noise_level]
    dn.check_levels(diffusion, levels)
    steps, samples = args.steps or [1, 2, 4], args.samples or [1, 4]
    spec = dn.CurveSpec(levels, steps, samples, options, seed, args.classical)
    crops = dn.eval_crops(run, args.split, args.batches)
    model = dit.model if dit else None
    result, galleries = dn.denoising_curves(run.model, diffusion, crops, spec, model)
    result |= {"split": args.split, "checkpoint": str(run.checkpoint)}
    if dit is not None:
        result["compare"] = str(dit.checkpoint)
    if args.grid:
        with atomic_path(args.grid) as temporary:
            dn.write_grid(galleries, temporary)
        result["grid"] = args.grid
    print_json(result) if args.json else print(json.dumps(result, indent=2))
    return 0


def add_denoise_command(sub: Any) -> None:
    levels = checked(
        lambda text: [float(item) for item in text.split(",")],
        lambda values: all(0 < value <= 1 for value in values),
        "a comma-separated list of noise levels in (0, 1], e.g. 0.1,0.2",
    )
    level = checked(float, lambda value: 0 < value <= 1, "a noise level in (0, 1]")
    help_text = "image runs: denoising curves, or denoise a photograph (--input)"
    denoise = add_run_parser(sub, "denoise", cmd_denoise, help_text)
    denoise.add_argument(
        "--noise-level", type=levels, default=None, help="default: data.noise_level,ood_noise_level"
    )
    once = "(--input: one value, default the trained steps)"
    denoise.add_argument(
        "--steps", type=STEPS_LIST, default=None, help=f"steps per landscape, 1,2,4 {once}"
    )
    denoise.add_argument("--samples", type=STEPS_LIST, default=None, help="best-of-N, e.g. 1,4")
    denoise.add_argument(
        "--perturbation",
        type=NON_NEGATIVE,
        default=0.05,
        help="best-of-N: std of the extra starts' Gaussian offsets from the noisy image "
        "(pixels in [-1, 1]; default 0.05)",
    )
    denoise.add_argument(
        "--halt-tolerance",
        type=POSITIVE,
        default=None,
        help="also think adaptively: an image stops when its energy moves less than this",
    )
    add_thinking_options(denoise)
    denoise.add_argument("--split", default="val", choices=["val", "test"])
    denoise.add_argument("--batches", type=INT_0, default=0, help="0: train.eval_batches")
    denoise.add_argument("--compare", default="", help="a DiT run to denoise the same crops")
    denoise.add_argument("--classical", action="store_true", help="NLM, TV, wavelet anchors")
    denoise.add_argument("--seed", type=SEED, default=None, help="default: the run's train.seed")
    denoise.add_argument("--grid", default="", help="write a PNG of a few crops per method")
    denoise.add_argument("--input", default="", help="a photograph to denoise (any size)")
    denoise.add_argument("--output", default="", help="with --input: the denoised image file")
    denoise.add_argument("--add-noise", type=level, default=None, help="noise --input first")
    denoise.add_argument(
        "--tile-stride", type=COUNT, default=None, help="with --input: default half a tile"
    )
    denoise.add_argument("--json", action="store_true")
