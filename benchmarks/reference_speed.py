"""Training-step speed and peak memory: our `ebt` vs the paper's own code (alexiglad/EBT).

How to run (the paper's code is imported at run time, never vendored here):

    git clone https://github.com/alexiglad/EBT /tmp/ebt-reference
    EBT_REFERENCE_DIR=/tmp/ebt-reference python benchmarks/reference_speed.py --repeats 10

`--device cuda --precision bf16` runs both codes on a GPU under bf16 autocast (peak memory is
then the peak CUDA allocation; benchmarks/gpu.py runs this and more in one command).

Entries (dim 256, 4 layers, 4 heads, context 128, batch 8, byte vocabulary of 257 with random
token ids 1..256, float32; each step is forward + loss + backward + AdamW step with the
paper's parameter groups; ours also clips the gradient norm, as `ebt train` does, the paper's
stepper does not):

- reference_ebt_time_embed: the paper's `EBT_NLP` (ebt_type time_embed) with System-1
  settings: 2 landscapes, step size 500 (learnable), softmax-normalised candidates, no
  Langevin noise, no randomisation, detached steps, no truncation; its `forward_loss_wrapper`.
- reference_transformer_pp: the paper's `Baseline_Transformer_NLP`.
- ours_ebt_time_embed, ours_ebt_pred_step, ours_transformer_pp: `ebt.training.bench._Stepper`.

All steps are timed in one process, interleaved step by step (so machine noise hits every
entry alike); the median is reported, and each ratio also as the median over rounds of the
per-round ratio (`ms_per_step_paired`, the more robust one on a busy machine). `--threads N`
pins torch's intra-op threads (default: torch's own choice). Peak memory is the peak resident
set (VmHWM, torch and the imported modules included) of a separate child process per entry
that takes two steps; `process_baseline_peak_mem_mb` is the same for a child that builds no
model (subtract it to compare the models' own memory).

The paper's modules import pytorch_lightning, torchmetrics, torchvision, diffusers and
transformers at module level; none of them is used on this path, so any that is not installed
is replaced by an inert stub while its modules are imported. The Hugging Face tokenizer it
loads is replaced by a stand-in with 257 entries and pad/eos id 0, so nothing touches the
network.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ebt.config import Config, finalize
from ebt.runtime import keep_freed_memory, synchronize
from ebt.training.bench import (
    _peak_rss_mb,
    _reset_peak_rss,
    _Stepper,
    interleaved_times,
    run_in_child,
)
from ebt.training.step import autocast_region

ENV_VAR = "EBT_REFERENCE_DIR"
CPU = torch.device("cpu")
VOCAB, DIM, LAYERS, HEADS, CONTEXT, BATCH, SEED = 257, 256, 4, 4, 128, 8, 33
LR, WEIGHT_DECAY, STEP_SIZE, STEP_SIZE_LR_MULTIPLIER = 1.2e-3, 0.01, 500.0, 1500.0

# The hyper-parameters the paper's EBT_NLP / Baseline_Transformer_NLP read (System-1 recipe).
REFERENCE_HPARAMS: dict[str, Any] = {
    "tokenizer": "byte-stand-in",
    "context_length": CONTEXT,
    "embedding_dim": DIM,
    "num_transformer_blocks": LAYERS,
    "multiheaded_attention_heads": HEADS,
    "batch_size_per_device": BATCH,
    "ffn_dim_multiplier": None,
    "weight_initialization_method": "xavier",
    "weight_initialization_gain": 1.0,
    "execution_mode": "pretrain",
    "debug_unused_parameters": False,
    "ebt_type": "time_embed",
    "ebt_norm": "rms",
    "ebt_act_func": "silu",
    "dyt_alpha_init": 0.5,
    "mcmc_num_steps": 2,
    "mcmc_step_size": STEP_SIZE,
    "mcmc_step_size_learnable": True,
    "mcmc_step_size_lr_multiplier": STEP_SIZE_LR_MULTIPLIER,
    "normalize_initial_condition": True,
    "normalize_initial_condition_only_first_step": False,
    "denoising_initial_condition": "random_noise",
    "gaussian_random_noise_scaling": 1.0,
    "no_mcmc_detach": False,
    "truncate_mcmc": False,
    "mcmc_replay_buffer": False,
    "randomize_mcmc_step_size_scale": 1.0,
    "randomize_mcmc_num_steps": 0,
    "randomize_mcmc_num_steps_min": 0,
    "randomize_mcmc_num_steps_final_landscape": False,
    "langevin_dynamics_noise": 0.0,
    "langevin_dynamics_noise_learnable": False,
    "vocab_to_embed_uses_prob_dist": False,
    "num_modality_processing_mlp_layers": 1,
    "clamp_futures_grad": False,
    "clamp_futures_grad_max_change": 9.0,
    "absolute_clamp": 0.0,
    "clamp_max_after_warm_up": 0.0,
    "sharpen_predicted_distribution": 0.0,
    "soften_target_prob_dist": 0.0,
    "reconstruction_coeff": 1.0,
    "contrastive_loss": False,
    "contrastive_loss_coeff": 0.0005,
}

STUBBED_PACKAGES: dict[str, tuple[str, ...]] = {
    "pytorch_lightning": (),
    "torchmetrics": (),
    "torchvision": ("transforms", "transforms.functional", "models", "utils"),
    "diffusers": (),
    "transformers": (),
}


# --------------------------------------------------------------------------- stand-ins


class _HParams(dict):
    """Attribute access to a dict (what the paper's code expects of `self.hparams`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _LightningModuleStandIn(nn.Module):
    """Just enough of LightningModule for construction and forward: hparams and device."""

    def __init__(self) -> None:
        super().__init__()
        self.hparams = _HParams()

    @property
    def device(self) -> torch.device:
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")


class _Unavailable:
    """Placeholder for names of stubbed packages; fails loudly if ever used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a stubbed optional dependency was used by the benchmark path")


class _ByteTokenizer:
    """Stand-in for the Hugging Face tokenizer: 257 entries, eos (= pad) id 0."""

    eos_token_id = 0
    pad_token_id = 0

    def __len__(self) -> int:
        return VOCAB

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> _ByteTokenizer:
        return cls()


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    # a spec, so that installed packages probing for this one (diffusers asks find_spec of
    # "transformers") get an answer instead of ValueError
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def __getattr__(attr: str) -> Any:  # PEP 562 module attribute hook
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    if name == "pytorch_lightning":
        module.LightningModule = _LightningModuleStandIn  # type: ignore[attr-defined]
    if name == "transformers":
        module.AutoTokenizer = _ByteTokenizer  # type: ignore[attr-defined]
    return module


@contextlib.contextmanager
def _missing_packages_stubbed() -> Iterator[None]:
    """Put inert modules in sys.modules for absent packages; take them out afterwards."""
    added = []
    for package, submodules in STUBBED_PACKAGES.items():
        if importlib.util.find_spec(package) is not None:
            continue
        for name in (package, *(f"{package}.{sub}" for sub in submodules)):
            sys.modules[name] = _stub_module(name)
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


# --------------------------------------------------------------------------- the paper's code


def reference_dir(model_file: str = "nlp/ebt.py", script: str = "reference_speed.py") -> str:
    """The paper's work tree (EBT_REFERENCE_DIR), checked to hold `model/<model_file>`."""
    path = os.environ.get(ENV_VAR, "")
    if not path or not os.path.isfile(os.path.join(path, "model", model_file)):
        sys.exit(
            f"{ENV_VAR} must point at a work tree of the paper's code (alexiglad/EBT), e.g.\n"
            "    git clone https://github.com/alexiglad/EBT /tmp/ebt-reference\n"
            f"    {ENV_VAR}=/tmp/ebt-reference python benchmarks/{script}"
        )
    return path


def import_reference(path: str) -> dict[str, types.ModuleType]:
    """The paper's NLP modules, imported from `path` with absent packages stubbed."""
    if path not in sys.path:
        sys.path.insert(0, path)
    names = ["model.ar_ebt_default", "model.ar_ebt_time_embed", "model.ar_ebt_adaln"]
    names += ["model.ar_transformer", "model.nlp.ebt", "model.nlp.baseline_transformer"]
    with _missing_packages_stubbed():
        modules = {name: importlib.import_module(name) for name in names}
    for name in ("model.nlp.ebt", "model.nlp.baseline_transformer"):
        modules[name].AutoTokenizer = _ByteTokenizer  # never reach the Hugging Face hub
    return modules


def paper_adamw(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    alpha_lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW with the paper's groups: alpha (its own lr, no decay) and the rest."""
    alpha = getattr(module, "alpha", None)
    params = [p for p in module.parameters() if p.requires_grad and p is not alpha]
    groups: list[dict[str, Any]] = [{"params": params, "lr": lr, "weight_decay": weight_decay}]
    if alpha is not None and alpha.requires_grad:
        groups.append({"params": [alpha], "lr": alpha_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=betas)


def config_adamw(module: nn.Module, config: Config) -> torch.optim.AdamW:
    """paper_adamw with the lr, decay, betas and alpha multiplier of one of our configs."""
    train = config.train
    alpha_lr = train.lr * config.think.step_size_lr_multiplier
    return paper_adamw(module, train.lr, train.weight_decay, alpha_lr, (train.beta1, train.beta2))


class PaperStepper:
    """Training steps of one of the paper's LightningModules on a fixed batch (`module`,
    `optimizer` and `batch` are set by each script's constructor). precision "bf16": the
    forward and loss under bf16 autocast, as its Lightning `bf16-mixed` runs them."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Any
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    def step(self) -> float:
        """Seconds for forward + loss + backward + optimizer step."""
        synchronize(self.device)
        start = time.perf_counter()
        with autocast_region(self.precision, self.device):
            loss = self.module.forward_loss_wrapper(self.batch, "train")["loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start


class _ReferenceStepper(PaperStepper):
    """The paper's LightningModule taking training steps on a fixed random batch (batch and
    context as in `hparams`) on `device`."""

    def __init__(
        self,
        module: nn.Module,
        device: torch.device = CPU,
        precision: str = "fp32",
        hparams: dict[str, Any] = REFERENCE_HPARAMS,
    ) -> None:
        self.module = module.to(device).train()
        self.device, self.precision = device, precision
        self.optimizer = paper_adamw(module, LR, WEIGHT_DECAY, LR * STEP_SIZE_LR_MULTIPLIER)
        generator = torch.Generator().manual_seed(SEED)
        shape = (hparams["batch_size_per_device"], hparams["context_length"] + 1)
        tokens = torch.randint(1, VOCAB, shape, generator=generator)
        self.batch = {"input_ids": tokens.to(device)}


def _reference_stepper(
    path: str,
    module_name: str,
    class_name: str,
    device: torch.device = CPU,
    precision: str = "fp32",
    hparams: dict[str, Any] = REFERENCE_HPARAMS,
) -> _ReferenceStepper:
    modules = import_reference(path)
    torch.manual_seed(SEED)
    model_class = getattr(modules[module_name], class_name)
    return _ReferenceStepper(model_class(dict(hparams)), device, precision, hparams)


# --------------------------------------------------------------------------- ours


def our_config(
    kind: str, variant: str = "time_embed", device: str = "cpu", precision: str = "fp32"
) -> Config:
    config = Config()
    config.train.device, config.train.precision = device, precision
    model, think, train = config.model, config.think, config.train
    model.kind, model.variant = kind, variant
    model.dim, model.layers, model.heads = DIM, LAYERS, HEADS
    think.landscapes, think.steps, think.step_size = 2, 1, STEP_SIZE
    think.step_size_learnable, think.step_size_lr_multiplier = True, STEP_SIZE_LR_MULTIPLIER
    config.data.seq_len = CONTEXT
    train.batch_size, train.lr, train.weight_decay, train.seed = BATCH, LR, WEIGHT_DECAY, SEED
    return finalize(config)


def _our_stepper(
    kind: str, variant: str = "time_embed", device: str = "cpu", precision: str = "fp32"
) -> _Stepper:
    config = our_config(kind, variant, device, precision)
    return _Stepper(config, VOCAB, torch.device(device))


# --------------------------------------------------------------------------- measuring

RUN: dict[str, str] = {"device": "cpu", "precision": "fp32"}  # main's --device / --precision


def _paper(path: str, module_name: str, class_name: str) -> _ReferenceStepper:
    device = torch.device(RUN["device"])
    return _reference_stepper(path, module_name, class_name, device, RUN["precision"])


BUILDERS: dict[str, Callable[[str], Any]] = {
    "reference_ebt_time_embed": lambda path: _paper(path, "model.nlp.ebt", "EBT_NLP"),
    "ours_ebt_time_embed": lambda path: _our_stepper("ebt", "time_embed", **RUN),
    "ours_ebt_pred_step": lambda path: _our_stepper("ebt", "pred_step", **RUN),
    "reference_transformer_pp": lambda path: _paper(
        path, "model.nlp.baseline_transformer", "Baseline_Transformer_NLP"
    ),
    "ours_transformer_pp": lambda path: _our_stepper("transformer_pp", **RUN),
}


class _Idle:
    """No model at all: the child's peak RSS from Python, torch and the imported modules."""

    def step(self) -> float:
        return 0.0


MEMORY_ONLY: dict[str, Callable[[str], Any]] = {"process_baseline": lambda path: _Idle()}
RATIOS = {
    "ebt_time_embed": ("ours_ebt_time_embed", "reference_ebt_time_embed"),
    "ebt_pred_step_vs_reference_time_embed": ("ours_ebt_pred_step", "reference_ebt_time_embed"),
    "transformer_pp": ("ours_transformer_pp", "reference_transformer_pp"),
}


def time_interleaved(path: str, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of every entry, one step of each in turn, warm-up steps dropped."""
    steppers = {name: build(path) for name, build in BUILDERS.items()}
    return interleaved_times(steppers, repeats, warmup)


def _peak_child(script: str, name: str, path: str, queue: Any) -> None:
    """In a spawned child: the peak RSS of entry `name` of benchmark module `script` (its
    BUILDERS or MEMORY_ONLY) over two steps, with the paper's modules imported."""
    keep_freed_memory()  # as in the parent: every entry, ours and the paper's, alike
    _reset_peak_rss()
    module = importlib.import_module(script)
    module.import_reference(path)  # every child holds the same imported modules
    stepper = (module.BUILDERS | getattr(module, "MEMORY_ONLY", {}))[name](path)
    for _ in range(2):
        stepper.step()
    queue.put(_peak_rss_mb())


def peak_memory_mb(name: str, path: str, script: str = "reference_speed") -> float:
    """Peak RSS of a fresh spawned child that builds entry `name` of `script` and takes two
    steps; on CUDA (--device) the peak CUDA allocation of the same, in this process."""
    device = torch.device(RUN["device"])
    if device.type != "cuda":
        return run_in_child(_peak_child, script, name, path)
    module = importlib.import_module(script) if script != __name__ else sys.modules[__name__]
    builders = module.BUILDERS | getattr(module, "MEMORY_ONLY", {})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    stepper = builders[name](path)
    for _ in range(2):
        stepper.step()
    del stepper
    return torch.cuda.max_memory_allocated(device) / 2**20


def entry_summaries(
    times: dict[str, list[float]], peak_mb: Callable[[str], float]
) -> dict[str, dict[str, float]]:
    """Median / min / max ms per step of every entry, and its peak memory (peak_mb(name))."""
    return {
        name: {
            "ms_per_step": round(1000 * statistics.median(seconds), 2),
            "ms_min": round(1000 * min(seconds), 2),
            "ms_max": round(1000 * max(seconds), 2),
            "peak_mem_mb": round(peak_mb(name), 1),
        }
        for name, seconds in times.items()
    }


def ratio_summaries(
    times: dict[str, list[float]], entries: dict[str, dict], pairs: dict[str, tuple[str, str]]
) -> dict[str, dict[str, float]]:
    """first / second of each named pair: ratios of medians, and the median per-round ratio."""
    ratios = {}
    for label, (first, second) in pairs.items():
        ratios[label] = {
            key: round(entries[first][key] / entries[second][key], 3)
            for key in ("ms_per_step", "peak_mem_mb")
        }
        rounds = zip(times[first], times[second], strict=True)
        ratios[label]["ms_per_step_paired"] = round(statistics.median(a / b for a, b in rounds), 3)
    return ratios


def summarise(times: dict[str, list[float]], path: str) -> dict[str, Any]:
    entries = entry_summaries(times, lambda name: peak_memory_mb(name, path))
    cuda = torch.device(RUN["device"]).type == "cuda"  # no process overhead in a CUDA peak
    baseline = 0.0 if cuda else round(peak_memory_mb("process_baseline", path), 1)
    return {
        "entries": entries,
        "process_baseline_peak_mem_mb": baseline,
        "ratios_ours_over_reference": ratio_summaries(times, entries, RATIOS),
    }


def redrawn_state(config: Config, seed: int) -> dict[str, torch.Tensor]:
    """Our model's state with every trained tensor redrawn N(0, 0.02^2) (adaLN-Zero would
    otherwise make an image energy constant), the step size and noise level kept."""
    from ebt.models import build_model

    generator = torch.Generator().manual_seed(seed)
    state = build_model(config).state_dict()
    for name, tensor in state.items():
        if name not in ("step_size", "langevin_std"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return state


def redrawn_stepper(config: Config, batch: Any, seed: int) -> _Stepper:
    """ebt's training step (what `ebt train` steps) on `config` with redrawn_state's weights
    and a fixed batch."""
    stepper = _Stepper(config, 0, torch.device("cpu"))
    stepper.objective.model.load_state_dict(redrawn_state(config, seed))
    stepper.batch = batch
    return stepper


def paired_entries(
    paper: Callable[[str, str], Any], ours: Callable[[str], Any], baseline: str
) -> tuple[dict[str, Callable[[str], Any]], dict[str, tuple[str, str]]]:
    """(BUILDERS, RATIOS) of a modality's side-by-side: the paper's and our EBT and `baseline`
    (paper(path, kind), ours(kind)), ours over the paper's for each, EBT over baseline in each."""
    builders: dict[str, Callable[[str], Any]] = {}
    for kind in ("ebt", baseline):
        builders[f"reference_{kind}"] = lambda path, kind=kind: paper(path, kind)
        builders[f"ours_{kind}"] = lambda path, kind=kind: ours(kind)
    ratios = {
        "ebt_ours_over_reference": ("ours_ebt", "reference_ebt"),
        f"{baseline}_ours_over_reference": (f"ours_{baseline}", f"reference_{baseline}"),
        f"ebt_over_{baseline}_ours": ("ours_ebt", f"ours_{baseline}"),
        f"ebt_over_{baseline}_reference": ("reference_ebt", f"reference_{baseline}"),
    }
    return builders, ratios


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Worst difference between two results relative to the largest magnitude of the second."""
    scale = theirs.detach().abs().max().clamp(min=1e-12)
    return ((ours.detach() - theirs.detach()).abs().max() / scale).item()


def run_modality_side_by_side(script: types.ModuleType, config: str, count_flops: bool) -> None:
    """The image and video scripts' main: arguments, parity, interleaved timing, FLOPs per step
    (count_flops), peak memory and ratios, printed as JSON. `script` is the benchmark module
    (its reference_dir, parity, import_reference, BUILDERS, RATIOS, SETTING)."""
    from ebt.training.bench import step_gflop

    args = side_by_side_arguments(script.__doc__ or "")
    path = script.reference_dir()
    result: dict[str, Any] = {
        "setting": f"{config} " + " ".join(script.SETTING),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "parity": script.parity(path),
    }
    steppers = {name: build(path) for name, build in script.BUILDERS.items()}
    times = interleaved_times(steppers, args.repeats, args.warmup)
    if count_flops:
        result["gflop_per_step"] = {
            name: round(step_gflop(stepper, False), 2) for name, stepper in steppers.items()
        }
    del steppers
    name = Path(script.__file__).stem  # what a spawned child imports (the script may be __main__)
    entries = entry_summaries(times, lambda entry: peak_memory_mb(entry, path, name))
    result |= {"entries": entries, "ratios": ratio_summaries(times, entries, script.RATIOS)}
    print(json.dumps(result, indent=2))


def side_by_side_arguments(description: str, device_flags: bool = False) -> argparse.Namespace:
    """--repeats, --warmup, --threads of a side-by-side script (and --device, --precision when
    device_flags), with the threads applied and the `ebt` CLI's allocator setting (applied to
    both codes alike)."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per entry")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per entry first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    if device_flags:
        parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (both codes)")
        choices = ("fp32", "bf16")
        help_text = "bf16: autocast for both codes (the paper's bf16-mixed)"
        parser.add_argument("--precision", default="fp32", choices=choices, help=help_text)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    return args


def main() -> None:
    args = side_by_side_arguments(__doc__, device_flags=True)
    RUN.update(device=args.device, precision=args.precision)
    path = reference_dir()
    times = time_interleaved(path, args.repeats, args.warmup)
    setting = {"dim": DIM, "layers": LAYERS, "heads": HEADS, "context": CONTEXT}
    dtype = "float32" if args.precision == "fp32" else "bf16 autocast"
    setting |= {"batch": BATCH, "vocab": VOCAB, "dtype": dtype, "device": args.device}
    result = {
        "setting": setting,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    result |= summarise(times, path)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
