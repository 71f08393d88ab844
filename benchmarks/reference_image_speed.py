"""Image training-step speed: our image EBT and DiT vs the paper's own code, side by side.

How to run (CPU; the paper's code is imported at run time, never vendored here):

    git clone https://github.com/alexiglad/EBT /tmp/ebt-reference
    pip install --target /tmp/timm --no-deps timm      # the paper's image models use timm
    EBT_REFERENCE_DIR=/tmp/ebt-reference PYTHONPATH=/tmp/timm \\
        python benchmarks/reference_image_speed.py --threads 1

Setting (the issue's): `configs/image/tiny.toml` with dim 256, 4 layers, 4 heads, 32 x 32
images, patch 4 (64 patches), batch 16, one thinking step (the paper's S1 `mcmc_num_steps 1`),
step size 3000 learnable, noise level 0.1 of 100 diffusion steps, float32. Entries:

- reference_ebt: the paper's `EBT_IMG_Denoise` and its `forward_loss_wrapper` (noising, the
  thinking step with `create_graph`, SmoothL1), then backward and an AdamW step with its
  parameter groups; reference_dit: its `Diffusion_Transformer_IMG_Denoise` (IDDPM hybrid loss).
- ours_ebt, ours_dit: `ebt.training.bench._Stepper`, i.e. what `ebt train` / `ebt bench train` step.

Both codes run the same weights (ours, drawn N(0, 0.02^2), exported with ebt's own
`export-reference` conversion and loaded strictly into the paper's modules) on the same clean
images; `parity` reports how far the paper's inference step and ours differ on them. Steps are
timed interleaved in one process; medians, and each ratio also as the median of per-round
ratios (`_paired`). Peak memory is the VmHWM of a spawned child per entry (two steps).

The paper's modules import pytorch_lightning, torchmetrics, diffusers, transformers and
torchvision at module level; stand-ins replace the absent ones (reference_speed.py). timm, which
its image models need, imports torchvision eagerly: where torchvision does not import, an inert
stand-in module is loaded first from `EBT_TORCHVISION_STUB` (default: `shared/tools/tvstub.py`
beside this repository, where the project keeps one).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import runpy
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_speed import (  # noqa: E402
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
from ebt.interop.image_config import image_export_defaults, image_hparams_from_config  # noqa: E402
from ebt.interop.image_reference import image_reference_state_dict  # noqa: E402
from ebt.models import build_model  # noqa: E402
from ebt.training.bench import _Stepper, baseline_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTING = [
    "model.dim=256",
    "model.layers=4",
    "model.heads=4",
    "data.image_size=32",
    "model.patch_size=4",
    "train.batch_size=16",
    "think.landscapes=1",
    "think.steps=1",
]
STUB_VAR = "EBT_TORCHVISION_STUB"
SEED = 33
MODULES = {"ebt": "model.img.ebt_denoise", "dit": "model.img.dit_denoise"}
CLASSES = {"ebt": "EBT_IMG_Denoise", "dit": "Diffusion_Transformer_IMG_Denoise"}


# --------------------------------------------------------------------------- the paper's code


def reference_dir() -> str:
    """The paper's work tree (EBT_REFERENCE_DIR), checked to hold its image models."""
    return shared_reference_dir("img/ebt_denoise.py", "reference_image_speed.py")


def _torchvision_stand_in() -> None:
    """Load the inert torchvision stand-in where torchvision itself does not import."""
    try:
        importlib.import_module("torchvision")
        return
    except Exception:  # absent, or present but broken (a build for another torch)
        pass
    stub = Path(os.environ.get(STUB_VAR, ROOT.parent / "shared" / "tools" / "tvstub.py"))
    if not stub.is_file():
        sys.exit(
            f"torchvision does not import and no stand-in was found at {stub}: set {STUB_VAR} "
            "to a module that makes `import torchvision...` succeed (timm imports it eagerly)"
        )
    runpy.run_path(str(stub))


def import_reference(path: str) -> dict[str, Any]:
    """The paper's image model classes, by kind ("ebt", "dit")."""
    if importlib.util.find_spec("timm") is None:
        sys.exit("the paper's image models need timm: pip install --target DIR --no-deps timm")
    _torchvision_stand_in()
    if importlib.util.find_spec("diffusers") is not None:  # before any stand-in: it probes
        importlib.import_module("diffusers")  # the others' import specs when imported
    if path not in sys.path:
        sys.path.insert(0, path)
    with _missing_packages_stubbed():
        modules = {kind: importlib.import_module(name) for kind, name in MODULES.items()}
    # its EBT blocks enter torch.backends.cuda.sdp_kernel (deprecated) on every forward
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*sdp_kernel")
    return {kind: getattr(modules[kind], CLASSES[kind]) for kind in MODULES}


class _TrainerStandIn:
    """What the paper's forward_loss_wrapper reads of its Lightning trainer: a step that logs
    no sample images (they are drawn every log_image_every_n_steps steps, not timed here)."""

    global_step = 1
    accumulate_grad_batches = 1

    class fit_loop:  # noqa: N801 - mirrors trainer.fit_loop.epoch_loop.batch_progress.current
        class epoch_loop:  # noqa: N801
            class batch_progress:  # noqa: N801
                class current:  # noqa: N801
                    completed = 0


# --------------------------------------------------------------------------- both sides


def our_config(kind: str) -> Config:
    """configs/image/tiny.toml at the issue's shape (kind "dit": its DiT twin)."""
    config = load_config(ROOT / "configs" / "image" / "tiny.toml", SETTING)
    return baseline_config(config) if kind == "dit" else config


def _clean_images(config: Config) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    size, batch = config.data.image_size, config.train.batch_size
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1  # (B, 3, S, S)


def reference_module(path: str, kind: str) -> tuple[nn.Module, Config]:
    """The paper's module built from ebt's exported hyper-parameters, our weights loaded."""
    config = our_config(kind)
    hparams = image_export_defaults(kind) | image_hparams_from_config(config)
    torch.manual_seed(SEED)
    module = import_reference(path)[kind](dict(hparams))
    patches = (config.data.image_size // config.model.patch_size) ** 2
    state = image_reference_state_dict(
        redrawn_state(config, SEED), kind == "dit", patches, prefix=""
    )
    module.load_state_dict(state, strict=True)
    module.trainer = _TrainerStandIn()
    return module, config


class _ReferenceStepper(PaperStepper):
    """The paper's LightningModule taking training steps on fixed clean images."""

    def __init__(self, path: str, kind: str) -> None:
        self.module, config = reference_module(path, kind)
        self.module.train()
        self.optimizer = config_adamw(self.module, config)
        self.batch = {"image": _clean_images(config)}


def our_stepper(kind: str) -> _Stepper:
    """ebt's training step with the same weights and clean images."""
    config = our_config(kind)
    return redrawn_stepper(config, _clean_images(config), SEED)


BUILDERS, RATIOS = paired_entries(_ReferenceStepper, our_stepper, "dit")


# --------------------------------------------------------------------------- measuring


@torch.no_grad()
def parity(path: str) -> dict[str, float]:
    """Worst relative difference, paper vs ours on the same weights and images: the EBT's
    inference step (state and energy) and the DiT's output at timestep 50."""
    module, config = reference_module(path, "ebt")
    ours = build_model(config)
    ours.load_state_dict(redrawn_state(config, SEED))
    noisy = _clean_images(config)
    states, energies = module(noisy, learning=False, no_randomness=True)
    trajectory = ours.think(noisy, steps=1)
    result = {
        "ebt_state": relative(trajectory.states[0], states[0]),
        "ebt_energy": relative(trajectory.energies[0], energies[0]),
    }
    module, config = reference_module(path, "dit")
    ours = build_model(config)
    ours.load_state_dict(redrawn_state(config, SEED))
    t = torch.full((noisy.shape[0],), 50)
    result["dit_output"] = relative(ours(noisy, t), module(noisy, t))
    return {key: float(f"{value:.3g}") for key, value in result.items()}


def main() -> None:
    run_modality_side_by_side(sys.modules[__name__], "configs/image/tiny.toml", False)


if __name__ == "__main__":
    main()
