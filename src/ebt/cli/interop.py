"""The interop subcommands of `ebt`: import-reference, export-reference, push.

`add_interop_commands(sub)` registers them on the main parser's subparsers; the work is done in
ebt.interop.convert and ebt.interop.hub. Their errors are ConfigError subclasses, which the main
command line reports as `ebt: error: ...` with exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _import(args: argparse.Namespace) -> Path:
    """The run's step dir: video checkpoints here, text and image ones in convert."""
    from ebt.interop.convert import import_reference, read_reference_checkpoint
    from ebt.interop.reference import InteropError
    from ebt.interop.video_reference import import_video_reference, is_video_reference

    loaded = read_reference_checkpoint(args.checkpoint)
    if not is_video_reference(loaded["hyper_parameters"], loaded["state_dict"]):
        del loaded
        return import_reference(args.checkpoint, args.out_dir, args.tokenizer)
    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"{out} exists and is not an empty directory; choose a new OUT_DIR")
    if args.tokenizer is not None:
        raise InteropError("--tokenizer is for text checkpoints; this one holds a video model")
    return import_video_reference(loaded, args.checkpoint, out)


def _video_summary(config: Any) -> tuple[str, str]:
    model, data = config.model, config.data
    kind = f"video EBT ({model.variant})" if model.kind == "ebt" else "video Transformer++"
    scaling = f" x {data.vae_scaling}" if data.vae_scaling != 1 else ""
    detail = (
        f"frames of {data.frame_dim} latents ({data.frame_encoder} {data.vae}{scaling}, not in "
        f"the checkpoint), clips of {data.frames} frames"
    )
    return kind, detail


def cmd_import_reference(args: argparse.Namespace) -> int:
    """`ebt import-reference CKPT OUT_DIR [--tokenizer SPEC]`."""
    from ebt.api import load_run

    step_dir = _import(args)
    run = load_run(args.out_dir)  # proves the run loads as ebt.load / eval / generate load it
    model, data = run.config.model, run.config.data
    shape = f"dim {model.dim}, {model.layers} layers, {model.heads} heads"
    if model.modality == "video":
        kind, detail = _video_summary(run.config)
    elif model.modality == "image":
        kind = "image EBT (denoising)" if model.kind == "ebt" else "DiT (denoising)"
        detail = (
            f"{data.image_size}x{data.image_size} images, patch {model.patch_size}, noise level "
            f"{data.noise_level} ({data.diffusion_steps} diffusion steps)"
        )
    else:
        kind = f"EBT ({model.variant})" if model.kind == "ebt" else "Transformer++"
        detail = f"vocabulary {run.tokenizer.vocab_size}, context {data.seq_len}"
    print(f"imported {args.checkpoint}: {kind}, {shape}, {detail} -> {step_dir}")
    return 0


def cmd_export_reference(args: argparse.Namespace) -> int:
    """`ebt export-reference RUN OUT.ckpt [--tokenizer-name NAME]`."""
    from ebt.interop.convert import export_reference, read_reference_checkpoint

    path = export_reference(args.run, args.out, args.tokenizer_name)
    hparams = read_reference_checkpoint(path)["hyper_parameters"]
    kind = hparams["model_name"]
    if hparams.get("modality") == "VID":
        print(
            f"exported {args.run} -> {path}: video {kind} for the paper's code, without its "
            "frozen VAE (the paper's code builds its own: load with strict=False)"
        )
        return 0
    if hparams.get("modality") == "IMG":
        print(f"exported {args.run} -> {path}: image {kind} (denoising) for the paper's code")
        return 0
    variant = f" ({hparams['ebt_type']})" if kind == "ebt" else ""
    print(
        f"exported {args.run} -> {path}: {kind}{variant} for the paper's code, which will load "
        f"the tokenizer '{hparams['tokenizer']}' (set it with --tokenizer-name)"
    )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """`ebt push RUN REPO_ID [--private] [--revision BRANCH] [--message TEXT]`."""
    from ebt.interop.hub import push_to_hub

    url = push_to_hub(
        args.run,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.message,
    )
    print(f"pushed {args.run} to {url}")
    return 0


def add_interop_commands(sub: Any) -> None:
    """Register import-reference, export-reference and push on the `ebt` subparsers."""
    importer = sub.add_parser(
        "import-reference", help="convert a checkpoint of the paper's code into an ebt run"
    )
    importer.add_argument(
        "checkpoint",
        help="Lightning .ckpt written by the paper's code (text, image or video model)",
    )
    importer.add_argument("out_dir", help="new (or empty) run directory to write")
    importer.add_argument(
        "--tokenizer",
        default=None,
        help="text checkpoints: byte | hf:NAME | tokenizer.json | directory; required unless "
        "the vocabulary is 257 (image checkpoints take none)",
    )
    importer.set_defaults(handler=cmd_import_reference)

    exporter = sub.add_parser(
        "export-reference", help="write an ebt run as a checkpoint of the paper's code"
    )
    exporter.add_argument("run", help="run directory (or one of its step_* checkpoints)")
    exporter.add_argument("out", help="the .ckpt file to write")
    exporter.add_argument(
        "--tokenizer-name", default=None, help="text: tokenizer the paper's code should load"
    )
    exporter.set_defaults(handler=cmd_export_reference)

    push = sub.add_parser("push", help="upload a run to the Hugging Face Hub (token: HF_TOKEN)")
    push.add_argument("run", help="run directory (or one of its step_* checkpoints)")
    push.add_argument("repo_id", help="Hub model repository, e.g. user/ebt-tiny")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", default=None, help="branch to commit to")
    push.add_argument("--message", default="Upload ebt model", help="commit message")
    push.set_defaults(handler=cmd_push)
