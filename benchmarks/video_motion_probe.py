"""How far a video run's next-frame predictions move, against how far the frames really move.

For clips of a video file (e.g. the README's astronaut pan GIF) and of the run's own splits:

- copying the last frame, and (`--shift DX DY`) the last frame shifted by a known motion in
  frame pixels (bilinear): how much a perfect motion estimate would gain at horizon 1;
- the run's prediction at horizon 1 (the rollout predictor, default thinking): its PSNR, the
  cosine between its change from the last frame and the true change, their length ratio, and the
  best gain g (the scale of the predicted change that minimises the error: 1 is calibrated, below
  1 it moves too far, above 1 not far enough).

    python benchmarks/video_motion_probe.py runs/video-tiny \
        --video astronaut-pan.gif --shift -0.5 -0.3125

CPU, one thread; prints one line per clip set.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ebt.api import load_run
from ebt.modalities.video.rollout import predictor_for, rollout, run_clips, video_file_clips
from ebt.modalities.video.task import frame_psnr
from ebt.modalities.video.thinking import FrameThinking


def shifted(frames: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """Frames (B, 3, S, S) moved by (dx, dy) frame pixels (content moves right / down), bilinear."""
    side = frames.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    grid = torch.stack([2 * (xs - dx) / side - 1, 2 * (ys - dy) / side - 1], -1)  # (S, S, 2)
    grid = grid.expand(frames.shape[0], -1, -1, -1)  # (B, S, S, 2)
    return F.grid_sample(frames, grid, padding_mode="border", align_corners=False)


def probe(run, clips: torch.Tensor, context: int, shift: tuple[float, float] | None) -> str:
    """One line for clips (B, T >= context + 1, 3, S, S): horizon 1 after `context` frames."""
    model, config = run.model, run.config
    flat = clips.flatten(2)  # (B, T, F)
    thinking = FrameThinking(init=config.think.init)
    predicted = rollout(predictor_for(model, thinking), flat[:, :context], 1).frames[:, 0]
    last, truth = flat[:, context - 1], flat[:, context]  # (B, F)
    change, true_change = predicted - last, truth - last  # (B, F)
    cosine = F.cosine_similarity(change, true_change, dim=1).mean()
    ratio = (change.norm(dim=1) / true_change.norm(dim=1)).mean()
    gain = ((change * true_change).sum(1) / change.pow(2).sum(1).clamp(min=1e-12)).mean()
    copied, ours = frame_psnr(last, truth).mean(), frame_psnr(predicted, truth).mean()
    line = f"copy {copied:.2f} dB, prediction {ours:.2f}"
    if shift is not None:
        moved = shifted(clips[:, context - 1], *shift).flatten(1)  # (B, F)
        line += f", true shift {frame_psnr(moved, truth).mean():.2f}"
    return line + f"; change: cosine {cosine:.3f}, length ratio {ratio:.3f}, best gain {gain:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--video", help="a video file or folder of frames")
    parser.add_argument("--shift", nargs=2, type=float, metavar=("DX", "DY"))
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--context", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = load_run(args.run)
    side = run.config.data.frame_size
    if args.video:
        clips = video_file_clips(args.video, args.context, args.context + 1, args.clips, side)
        print(f"{args.video}: {probe(run, clips, args.context, args.shift)}")
    for split in ("val", "test", "ood"):
        clips = run_clips(run.config, split, args.context + 1, args.clips)
        print(f"{split}: {probe(run, clips, args.context, None)}")


if __name__ == "__main__":
    main()
