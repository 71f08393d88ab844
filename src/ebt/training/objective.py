"""The training / evaluation objective of every modality: the EBT thinking loss (think from the
task's initial state, the task's loss on every step) and the baselines' own losses.

What differs between modalities is a task (modalities/): how a batch splits into context and
targets, the initial state, the per-step loss. Everything else, the S1/S2 recipe included, is
written once here.

The candidate gradient is taken inside `Objective.forward`, so a DistributedDataParallel wrapper
around the objective sees an ordinary forward and an ordinary `backward()` afterwards, and
synchronises the parameter gradients of the full second-order objective.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from ebt.config import ThinkConfig
from ebt.modalities.text.task import TextTask, cross_entropy, initial_state
from ebt.models import ContextCache, EnergyTransformer
from ebt.thinking.loop import StepOptions, step_schedule, think

__all__ = ["Objective", "ObjectiveOutput", "backward", "cross_entropy", "initial_state"]


def backward(loss: torch.Tensor, model: nn.Module) -> None:
    """loss.backward() into the model's trainable parameters only.

    Naming the inputs lets autograd skip the gradient into the thinking state (a leaf that
    requires grad only so that dE/dp can be taken), which would cost a (B*S, D) x (D, V) matmul
    and a softmax backward per step and is never used.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.backward(loss, inputs=parameters)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar, carries the graph in training
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars / vectors
    final_state: torch.Tensor | None = None  # (B, S, V) raw final candidates (EBT only)


def training_step_size(
    model: nn.Module, think_config: ThinkConfig, shape: tuple[int, ...], randomize: bool
) -> torch.Tensor:
    """alpha clamped at 1e-4; in training with scale s != 1, per-candidate U[alpha/s, alpha*s]
    of `shape` (text: (B, S, 1) per token; images: (B, 1, 1, 1) per image)."""
    alpha = model.step_size.clamp(min=1e-4)
    scale = think_config.step_size_random_scale
    if not randomize or scale == 1:
        return alpha
    low, high = alpha / scale, alpha * scale
    return low + torch.rand(*shape, device=alpha.device) * (high - low)


def step_options(
    model: nn.Module,
    think_config: ThinkConfig,
    step_size: torch.Tensor,
    training: bool,
    recompute: bool = False,
) -> StepOptions:
    noise = think_config.langevin_noise
    langevin = model.langevin_std.clamp(min=1e-6) if noise != 0 else 0.0
    return StepOptions(
        step_size=step_size,
        langevin_std=langevin,
        create_graph=training,
        truncate=think_config.truncate,
        detach=think_config.detach,
        grad_clamp=think_config.grad_clamp,
        absolute_clamp=think_config.absolute_clamp,
        recompute=training and recompute,
    )


def is_energy_model(model: nn.Module) -> bool:
    """Whether the model thinks (has a step size) rather than predicting directly."""
    return hasattr(model, "step_size")


class Objective(nn.Module):
    """Wraps a model with its task's loss; `forward(batch)` returns an ObjectiveOutput.

    task: the modality's (default: text, TextTask(model.vocab_size, pad_id)); for text a batch
    is (B, S + 1) token ids, inputs batch[:, :-1] and targets batch[:, 1:].
    """

    def __init__(
        self, model: nn.Module, think_config: ThinkConfig, pad_id: int = 0, task=None
    ) -> None:
        super().__init__()
        self.model = model
        self.think_config = think_config
        self.task = task if task is not None else TextTask(model.vocab_size, pad_id)
        # Recompute each second-order thinking step in backward (train.activation_checkpointing)
        self.activation_checkpointing = False

    def forward(
        self, batch: torch.Tensor, replay_states: torch.Tensor | None = None
    ) -> ObjectiveOutput:
        context, targets = self.task.split(batch)
        if is_energy_model(self.model):
            return self._ebt(context, targets, replay_states)
        return self._baseline(context, targets)

    def _baseline(self, context, targets: torch.Tensor) -> ObjectiveOutput:
        """The baseline's training loss; at evaluation the task's loss on its prediction."""
        task, model = self.task, self.model
        if self.training:
            loss = task.baseline_training_loss(model, context, targets)
            return ObjectiveOutput(loss, {"loss": loss.detach(), "final_step_loss": loss.detach()})
        prediction = task.baseline_prediction(model, context, targets)
        loss = task.loss(prediction, targets)
        passes = torch.tensor(float(task.baseline_forward_passes), device=targets.device)
        metrics = {"loss": loss.detach(), "final_step_loss": loss.detach()}
        metrics |= {"forward_passes": passes} | task.quality(prediction, targets)
        return ObjectiveOutput(loss, metrics)

    def _setup(self, context, targets: torch.Tensor, replay_states: torch.Tensor | None):
        """(initial state, step schedule, step options) of one batch."""
        model, think_config, training = self.model, self.think_config, self.training
        init = self.task.initial_state(think_config, context, targets)
        if replay_states is not None and len(replay_states):  # replayed rows come last
            init[init.shape[0] - replay_states.shape[0] :] = replay_states
        shape = self.task.step_size_shape(targets)
        step_size = training_step_size(model, think_config, shape, training)
        schedule = step_schedule(
            think_config.landscapes,
            think_config.steps,
            think_config.random_steps,
            think_config.random_steps_min,
            think_config.random_steps_final_landscape,
            training,
        )
        recompute = self.activation_checkpointing
        options = step_options(model, think_config, step_size, training, recompute)
        return init, schedule, options

    def _ebt(self, context, targets: torch.Tensor, replay_states) -> ObjectiveOutput:
        init, schedule, options = self._setup(context, targets, replay_states)
        trajectory = think(self.model, context, init, schedule, options)
        return self._ebt_loss(trajectory, targets)

    def _ebt_loss(self, trajectory, targets: torch.Tensor) -> ObjectiveOutput:
        truncate = self.think_config.truncate
        losses = []
        for index, state in enumerate(trajectory.states):
            keep = self.training and (not truncate or index == len(trajectory.states) - 1)
            with torch.set_grad_enabled(keep):
                losses.append(self.task.loss(state, targets))
        loss = losses[-1] if truncate else torch.stack(losses).mean()
        output = self._output(loss, losses, trajectory.energies, trajectory.states[-1])
        if not self.training:  # energy evaluations per prediction: one per thinking step
            passes = torch.tensor(float(len(trajectory.states)), device=targets.device)
            output.metrics["forward_passes"] = passes
            output.metrics |= self.task.quality(trajectory.states[-1], targets)
        return output

    def _output(self, loss, losses: list, energies: list, final: torch.Tensor) -> ObjectiveOutput:
        per_step = torch.stack([item.detach() for item in losses])
        energy_per_step = torch.stack([energy.mean() for energy in energies])
        metrics = {
            "loss": loss.detach(),
            "initial_loss": per_step[0],
            "final_step_loss": per_step[-1],
            "loss_per_step": per_step,
            "energy_per_step": energy_per_step,
            "energy_gap": energy_per_step[0] - energy_per_step[-1],
            "step_size": self.model.step_size.detach().clone(),
        }
        return ObjectiveOutput(loss, metrics, final.detach())

    def landscapewise(self) -> bool:
        """Whether forward_backward can free each landscape's graph before the next one."""
        think_config = self.think_config
        return (
            self.training
            and isinstance(self.model, EnergyTransformer)
            and think_config.detach
            and not think_config.truncate
            and think_config.landscapes > 1
        )

    def forward_backward(
        self, batch: torch.Tensor, replay_states: torch.Tensor | None = None, scale: float = 1.0
    ) -> ObjectiveOutput:
        """forward(batch), then backward of loss * scale into the parameters; returns the
        output with its loss detached.

        When landscapewise(): with detached steps a landscape depends on the earlier ones only
        through a detached state, so its part of the loss is back-propagated as soon as its
        steps are done, freeing its second-order graph before the next landscape builds one
        (peak activation memory of one landscape, not all). The context stream runs once for
        every landscape (stacked rows; one shared context for pred_step and default) and is
        cut into leaf keys/values; what the landscapes send it is back-propagated through the
        context stream once, at the end. The gradients equal those of
        the one-backward path up to summation order. Single process only: DDP and FSDP need one
        backward per forward.
        """
        if self.landscapewise():
            return self._backward_by_landscape(batch, replay_states, scale)
        output = self(batch, replay_states)
        backward(output.loss * scale, self.model)
        return dataclasses.replace(output, loss=output.loss.detach())

    def _backward_by_landscape(
        self, batch: torch.Tensor, replay_states: torch.Tensor | None, scale: float
    ) -> ObjectiveOutput:
        inputs, targets = self.task.split(batch)
        init, schedule, options = self._setup(inputs, targets, replay_states)
        options, cuts = _cut_options(options)
        caches = self.model.encode_landscapes(inputs, sorted(set(schedule)))
        for landscape, cache in caches.items():
            caches[landscape], cache_cuts = _leaf_cache(cache)
            cuts += cache_cuts
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        leaves = [leaf for _, leaf in cuts]
        state, losses, energies = init, [], []
        for landscape, run in itertools.groupby(schedule):
            steps = [landscape] * len(list(run))
            trajectory = think(self.model, inputs, state, steps, options, None, caches)
            part = [self.task.loss(s, targets) for s in trajectory.states]
            weighted = torch.stack(part).sum() * (scale / len(schedule))
            torch.autograd.backward(weighted, inputs=parameters + leaves)  # frees this landscape
            losses += part
            energies += trajectory.energies
            state = trajectory.states[-1].detach()
        reached = [(tensor, leaf.grad) for tensor, leaf in cuts if leaf.grad is not None]
        if reached:  # through the shared context stream and alpha's clamp, once
            tensors, grads = zip(*reached, strict=True)
            torch.autograd.backward(list(tensors), list(grads), inputs=parameters)
        loss = torch.stack([item.detach() for item in losses]).mean()
        return self._output(loss, losses, energies, state)


def _leaf_cache(cache: ContextCache) -> tuple[ContextCache, list[tuple[torch.Tensor, ...]]]:
    """The cache with its keys, values and condition as leaves that collect the landscapes'
    gradients, and the (original, leaf) pairs."""
    originals = cache.keys + cache.values
    if cache.condition is not None:
        originals.append(cache.condition)
    leaves = [tensor.detach().requires_grad_() for tensor in originals]
    layers = len(cache.keys)
    condition = leaves[2 * layers] if cache.condition is not None else None
    leaf_cache = ContextCache(
        leaves[:layers], leaves[layers : 2 * layers], cache.landscape, condition
    )
    return leaf_cache, list(zip(originals, leaves, strict=True))


def _cut_options(options: StepOptions) -> tuple[StepOptions, list[tuple[torch.Tensor, ...]]]:
    """The step size / noise level as leaves (they are computed once, from parameters, and
    read by every landscape), and the (original, leaf) pairs."""
    cuts, replaced = [], {}
    for name in ("step_size", "langevin_std"):
        value = getattr(options, name)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            replaced[name] = value.detach().requires_grad_()
            cuts.append((value, replaced[name]))
    return dataclasses.replace(options, **replaced), cuts
