"""Video training-step speed: our video EBT and Transformer++ vs the paper's own video code.

How to run (CPU; the paper's code is imported at run time, never vendored here):

    git clone https://github.com/alexiglad/EBT /tmp/ebt-reference
    EBT_REFERENCE_DIR=/tmp/ebt-reference python benchmarks/reference_video_speed.py --threads 1

Setting (the issue's, `ebt bench train configs/video/frame-tiny.toml ...`): dim 256, 4 layers, 4
heads, `time_embed`, clips of 16 frames of 3136 numbers (the SD-VAE latents of 224 x 224
frames), batch 8, 2 landscapes x 1 step, the tiny preset's recipe (step size learnable,
candidates from zeros), float32. Both codes read the same precomputed random latents: the
paper's VAE (which its code re-runs on every frame at every step) is left out of both, its
`load_image_encoder` replaced by an empty module and its `get_encoded_images` by the identity,
so only the models are timed. Entries:

- reference_ebt: the paper's `EBT_VID.forward_loss_wrapper` (down-projection, the concatenated
  two-stream sequence, the thinking steps with `create_graph`, SmoothL1), then backward and an
  AdamW step with its parameter groups; reference_transformer_pp: its `Baseline_Transformer_VID`.
- ours_ebt, ours_transformer_pp: `ebt.training.bench._Stepper`, i.e. what `ebt train` / `ebt bench
  train` step.

Both codes run the same weights (ours, drawn N(0, 0.02^2), exported with ebt's own video
`export-reference` conversion and loaded strictly into the paper's modules); `parity` reports
how far the paper's inference thinking and ours differ on them; `gflop_per_step` counts each
entry's step (torch.utils.flop_counter). Steps are timed interleaved in one process; medians,
and each ratio also as the median of per-round ratios (`_paired`). Peak memory is the VmHWM of
a spawned child per entry (two steps). The paper's modules import pytorch_lightning,
torchmetrics, torchvision and diffusers at module level; inert stand-ins replace the absent ones
(reference_speed.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_speed import (  # noqa: E402
    REFERENCE_HPARAMS,
    PaperStepper,
    _missing_packages_stubbed,
    config_adamw,
    paired_entries,
    redrawn_state,
    redrawn_stepper,
    relative,
    run_modality_side_by_side,
)
from reference_speed import reference_dir as shared_reference_dir  # noqa: E402

from ebt.config import Config, load_config  # noqa: E402
from ebt.interop.video_reference import (  # noqa: E402
    video_hparams_from_config,
    video_reference_state_dict,
)
from ebt.models import build_model, frame_dim  # noqa: E402
from ebt.training.bench import _Stepper, baseline_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTING = [
    "model.dim=256",
    "model.layers=4",
    "model.heads=4",
    "model.variant=time_embed",
    "data.frames=16",
    "data.frame_encoder=vae",  # 224 x 224 frames through the SD VAE: 3136 numbers a frame
    "data.frame_size=224",
    "train.batch_size=8",
    "think.landscapes=2",
    "think.steps=1",
]
SEED = 33
MODULES = {"ebt": "model.vid.ebt", "transformer_pp": "model.vid.baseline_transformer"}
CLASSES = {"ebt": "EBT_VID", "transformer_pp": "Baseline_Transformer_VID"}
MODEL_NAMES = {"ebt": "ebt", "transformer_pp": "baseline_transformer"}


# --------------------------------------------------------------------------- the paper's code


def reference_dir() -> str:
    """The paper's work tree (EBT_REFERENCE_DIR), checked to hold its video models."""
    return shared_reference_dir("vid/ebt.py", "reference_video_speed.py")


def _no_frame_encoder(*args: Any, **kwargs: Any) -> nn.Module:
    """Stands in for the paper's load_image_encoder: no VAE (the latents are precomputed)."""
    return nn.Module()


def _latents_as_they_are(batch: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Stands in for the paper's get_encoded_images: the batch already holds the latents."""
    return batch


def import_reference(path: str) -> dict[str, Any]:
    """The paper's video model classes, by kind, with its frame encoder left out."""
    if importlib.util.find_spec("diffusers") is not None:  # before any stand-in: it probes
        importlib.import_module("diffusers")  # the others' import specs when imported
    if path not in sys.path:
        sys.path.insert(0, path)
    with _missing_packages_stubbed():
        modules = {kind: importlib.import_module(name) for kind, name in MODULES.items()}
    for module in modules.values():  # `from model.model_utils import *` copied both names
        module.load_image_encoder = _no_frame_encoder
        module.get_encoded_images = _latents_as_they_are
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*sdp_kernel")
    return {kind: getattr(modules[kind], CLASSES[kind]) for kind in MODULES}


# --------------------------------------------------------------------------- both sides


def our_config(kind: str) -> Config:
    """configs/video/frame-tiny.toml at the issue's shape (kind "transformer_pp": its twin)."""
    config = load_config(ROOT / "configs" / "video" / "tiny.toml", SETTING)
    assert frame_dim(config) == 3136
    return baseline_config(config) if kind == "transformer_pp" else config


def _latents(config: Config) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    shape = (config.train.batch_size, config.data.frames, frame_dim(config))
    return torch.randn(shape, generator=generator)  # (B, T, 3136)


def reference_module(path: str, kind: str) -> tuple[nn.Module, Config]:
    """The paper's module built from ebt's exported hyper-parameters, our weights loaded."""
    config = our_config(kind)
    hparams = REFERENCE_HPARAMS | video_hparams_from_config(config)
    hparams |= {"model_name": MODEL_NAMES[kind], "batch_size_per_device": config.train.batch_size}
    torch.manual_seed(SEED)
    module = import_reference(path)[kind](dict(hparams))
    state = video_reference_state_dict(redrawn_state(config, SEED), config.model.variant, prefix="")
    module.load_state_dict(state, strict=True)
    return module, config


class _ReferenceStepper(PaperStepper):
    """The paper's LightningModule taking training steps on fixed latents."""

    def __init__(self, path: str, kind: str) -> None:
        self.module, config = reference_module(path, kind)
        self.module.train()
        self.optimizer = config_adamw(self.module, config)
        self.batch = _latents(config)


def our_stepper(kind: str) -> _Stepper:
    """ebt's training step with the same weights and latents."""
    config = our_config(kind)
    return redrawn_stepper(config, _latents(config), SEED)


BUILDERS, RATIOS = paired_entries(_ReferenceStepper, our_stepper, "transformer_pp")


# --------------------------------------------------------------------------- measuring


def parity(path: str) -> dict[str, float]:
    """Worst relative difference, paper vs ours on the same weights and latents: the EBT's
    inference thinking (every state and energy) and the Transformer++'s next frames."""
    module, config = reference_module(path, "ebt")
    ours = build_model(config)
    ours.load_state_dict(redrawn_state(config, SEED))
    context = _latents(config)[:, :-1]  # (B, 15, 3136)
    states, energies = module(context, learning=False, no_randomness=True)  # from zeros
    trajectory = ours.think(context, init=torch.zeros_like(context))
    batch, count = context.shape[:2]
    result = {
        "ebt_states": max(relative(a, b) for a, b in zip(trajectory.states, states, strict=True)),
        "ebt_energies": max(
            relative(a, b.view(batch, count))
            for a, b in zip(trajectory.energies, energies, strict=True)
        ),
    }
    module, config = reference_module(path, "transformer_pp")
    ours = build_model(config)
    ours.load_state_dict(redrawn_state(config, SEED))
    with torch.no_grad():
        result["transformer_pp_frames"] = relative(ours(context), module(context))
    return {key: float(f"{value:.3g}") for key, value in result.items()}


def main() -> None:
    run_modality_side_by_side(sys.modules[__name__], "configs/video/frame-tiny.toml", True)


if __name__ == "__main__":
    main()
