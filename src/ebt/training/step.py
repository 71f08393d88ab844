"""One training step for every caller: `ebt train` (trainer.py), `ebt bench train` (bench.py),
the scaling study's FLOP count (experiment/flops.py) and the scripts in benchmarks/.

`TrainingStep` owns what makes a step fast or slow on a device, so no caller can forget it:

- the precision (`train.precision`): "auto" resolves to bf16 autocast on CUDA (float32 master
  weights and optimizer state; bf16 needs no gradient scaler) and to float32 elsewhere; "bf16"
  is bf16 autocast on whatever device runs (CPU autocast on CPU); "fp32" is no autocast. One
  autocast region wraps the whole micro-step (every thinking step, the loss and its backward),
  so each weight is cast to bf16 once per step (autocast's cast cache lives for one region);
- the float32 matmul policy (`train.tf32`): TF32 tensor cores for float32 matrix products on
  CUDA (no effect on other devices);
- compilation (`train.compile`, `train.cuda_graphs`): see `prepare_model`;
- forward + backward (gradient accumulation, DDP's no_sync on all but the last micro-step),
  then clipping, the optimizer step and zeroing the gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ebt.config import ConfigError, TrainConfig
from ebt.models import compile_for_training, prepare_inductor
from ebt.training.distributed import clip_grad_norm, no_sync, sync_replicated_grads
from ebt.training.objective import ObjectiveOutput, backward

PRECISIONS = ("auto", "fp32", "bf16")


def _device_type(device: torch.device | str) -> str:
    return device if isinstance(device, str) else device.type


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision a step runs in: "auto" -> "bf16" on CUDA, "fp32" on any other device;
    "fp32" and "bf16" as given. `device` may be a device or its type ("cuda", "cpu")."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision={precision!r}: must be one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if _device_type(device) == "cuda" else "fp32"
    return precision


def autocast_region(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast region of one step: bf16 autocast on the device (CUDA or CPU autocast), or
    nothing for float32."""
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"train.precision=bf16: torch has no autocast for {device.type}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def apply_matmul_policy(tf32: bool, device: torch.device | str) -> None:
    """train.tf32 on CUDA: float32 matrix products (and cuDNN convolutions) on TF32 tensor
    cores, or IEEE float32 when off. Nothing on other devices. Process-wide, as torch's flag is."""
    if _device_type(device) != "cuda":
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; the allow_tf32 flags are deprecated
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def prepare_model(model: nn.Module, train: TrainConfig, device: torch.device) -> nn.Module:
    """The model as a step trains it: train.compile compiles its training passes (inductor; the
    context stream and the written-out energies + gradient). With train.cuda_graphs the
    TrainingStep compiles the whole forward instead (see compile_whole_forward)."""
    if train.compile and not train.cuda_graphs:
        compile_for_training(model, device)
    return model


def whole_forward(objective: nn.Module) -> Callable:
    """objective(batch, replay_states) as plain tensors: (loss, metrics, final state)."""

    def forward(batch: Any, replay_states: torch.Tensor | None):
        output = objective(batch, replay_states)
        return output.loss, output.metrics, output.final_state

    return forward


def compile_whole_forward(objective: nn.Module, device: torch.device) -> Callable:
    """train.cuda_graphs: the whole first-order training forward (every thinking step with the
    written-out gradient, and the loss) compiled as ONE graph (fullgraph: a graph break is an
    error, not a silent slowdown); its backward is AOTAutograd's compiled backward. On CUDA
    with mode="reduce-overhead": the graphs are captured as CUDA graphs and replayed (one launch
    instead of thousands, at fixed shapes). On CPU: inductor's default mode, no graphs."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(whole_forward(objective), fullgraph=True, dynamic=False, mode=mode)


class TrainingStep:
    """Forward + backward and the optimizer step of one model, under the run's precision.

    objective: the Objective (model + task loss); wrapped: what trains it under torchrun (DDP or
    the FSDP-sharded objective; None in one process, where the objective's landscape-by-landscape
    forward_backward runs).
    """

    def __init__(
        self,
        objective: nn.Module,
        optimizer: torch.optim.Optimizer,
        train: TrainConfig,
        device: torch.device,
        wrapped: nn.Module | None = None,
    ) -> None:
        self.objective, self.optimizer, self.wrapped = objective, optimizer, wrapped
        self.model: nn.Module = objective.model
        self.device, self.grad_clip = device, train.grad_clip
        self.precision = resolve_precision(train.precision, device)
        self.tf32 = train.tf32 and device.type == "cuda"
        apply_matmul_policy(train.tf32, device)
        self.whole: Callable | None = None
        if train.compile and train.cuda_graphs:
            if wrapped is not None:
                raise ConfigError("train.cuda_graphs: one process only (not under torchrun)")
            prepare_inductor(device)
            self.whole = compile_whole_forward(objective, device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_region(self.precision, self.device)

    def forward_backward(
        self,
        batch: Any,
        replay_states: torch.Tensor | None = None,
        scale: float = 1.0,
        sync: bool = True,
    ) -> ObjectiveOutput:
        """One micro-step: loss * scale back-propagated into the parameters' .grad (summed over
        micro-steps); sync=False skips DDP's all-reduce (not the last micro-step)."""
        if self.whole is not None:
            return self._whole_forward_backward(batch, replay_states, scale)
        if self.wrapped is None:
            with self.autocast():  # every thinking step, the loss and its backward
                return self.objective.forward_backward(batch, replay_states, scale)
        with no_sync(self.wrapped, sync):
            with self.autocast():
                output = self.wrapped(batch, replay_states)
            backward(output.loss * scale, self.model)
        return output

    def _whole_forward_backward(
        self, batch: Any, replay_states: torch.Tensor | None, scale: float
    ) -> ObjectiveOutput:
        """The compiled whole forward, one backward. Its outputs are cloned: a CUDA graph
        replay overwrites the previous replay's outputs (the next micro-step's)."""
        with self.autocast():
            try:
                loss, metrics, final = self.whole(batch, replay_states)
            except torch._dynamo.exc.Unsupported as error:  # a graph break under fullgraph
                first = str(error).strip().splitlines()[0]
                raise ConfigError(
                    f"train.cuda_graphs: the training forward does not trace as one graph "
                    f"({first}); set train.cuda_graphs=false"
                ) from error
            backward(loss * scale, self.model)
        metrics = {name: value.detach().clone() for name, value in metrics.items()}
        final = None if final is None else final.detach().clone()
        return ObjectiveOutput(loss.detach().clone(), metrics, final)

    def optimizer_step(self, scheduler: Any = None) -> torch.Tensor:
        """Clip (train.grad_clip), step the optimizer (and scheduler), zero the gradients;
        returns the gradient norm before clipping (a tensor: reading it waits for the device)."""
        sync_replicated_grads(self.model)
        norm = clip_grad_norm(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if scheduler is not None:
            scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def __call__(self, batch: Any) -> ObjectiveOutput:
        """A whole step on one batch: forward_backward, then optimizer_step."""
        output = self.forward_backward(batch)
        self.optimizer_step()
        return output

    def record(self) -> dict[str, Any]:
        """What a run directory and a bench result state about how the step ran."""
        return {"device": str(self.device), "precision": self.precision, "tf32": self.tf32}
