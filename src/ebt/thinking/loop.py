"""Thinking: gradient descent on candidates against a model's energy, as a pure function.

One loop serves every modality. A model maps its raw state to the input its energy reads
(`candidate_input`), and one step is

    x = candidate_input(y [+ Langevin noise]);   E = energies(context, x);   y' = x - alpha * dE/dx

For text a state y (B, S, V) holds logits and x = softmax(y) (the gradient is taken with
respect to the probabilities, as in the paper's code; y' is used as logits by the loss and
softmaxed again by the next step). For images the state is the image (B, C, H, W) and x = y;
for video a frame vector per position (B, S, F), x = y, and the Langevin noise is added to the
model's embedding of x rather than to y, as the paper's video code does.
The context stream (if the model has one) is encoded once per landscape and reused by every
step on that landscape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.utils.checkpoint import checkpoint

from ebt.errors import ThinkingError


class EnergyModel(Protocol):
    context_depends_on_landscape: bool
    step_size: torch.Tensor
    langevin_std: torch.Tensor  # the trained Langevin sigma (inference default)

    def encode_context(self, context: torch.Tensor | None, landscape: int = 0): ...

    def candidate_input(self, state: torch.Tensor) -> torch.Tensor: ...

    def energies(self, cache, candidates: torch.Tensor, rows=None, landscape=None): ...

    # for inference (step_options): resolve_step_size(step_size) -> the inference alpha;
    # optional: energies_and_gradient(cache, candidates, rows, landscape, create_graph);
    # langevin_after_embedding = True: Langevin noise goes to the embedded candidates (video,
    # as the paper's code), passed as energies(..., langevin_std=...), not to the state


@dataclass
class StepOptions:
    """How each step is taken. step_size is a scalar tensor or per-token (B, S, 1)."""

    step_size: torch.Tensor
    langevin_std: float | torch.Tensor = 0.0
    create_graph: bool = False  # keep second-order terms (training)
    truncate: bool = False  # only the last step keeps second-order terms
    detach: bool = True  # cut the graph between steps
    grad_clamp: float = 0.0  # clamp dE/dp to +-grad_clamp / alpha (0 = off)
    absolute_clamp: float = 0.0  # clamp the new state to +-absolute_clamp (0 = off)
    recompute: bool = False  # activation checkpointing of every step that keeps its graph
    accept_lower_energies: bool = False  # inference: keep a step only where it lowers the energy


@dataclass
class InferenceOptions:
    """How a trained model thinks at inference, beyond the number of steps.

    step_size: None the trained alpha; 0 < a < 1 that fraction of it; a >= 1 the absolute alpha.
    langevin_noise: None the trained sigma; 0 none (also for a System-2 checkpoint).
    accept_lower_energies: keep each step only where it lowers the energy (one extra forward).
    """

    step_size: float | None = None
    langevin_noise: float | None = None
    accept_lower_energies: bool = False

    def think_arguments(self) -> dict:
        """Keyword arguments for EnergyTransformer.think."""
        return {
            "step_size": self.step_size,
            "langevin_noise": self.langevin_noise,
            "accept_lower_energies": self.accept_lower_energies,
        }

    def check_halting(self, tolerance: float | None) -> None:
        """Adaptive halting (a tolerance) and accept-lower-energies do not combine."""
        if tolerance is not None and self.accept_lower_energies:
            raise ValueError("adaptive halting does not combine with accept_lower_energies")

    @property
    def evaluations_per_step(self) -> int:
        return 2 if self.accept_lower_energies else 1


@dataclass
class Trajectory:
    """states[k]: raw candidate after step k; energies[k] (B, S): energy of the state step k
    starts from; landscapes[k]: the landscape step k was taken on."""

    states: list[torch.Tensor] = field(default_factory=list)
    energies: list[torch.Tensor] = field(default_factory=list)
    landscapes: list[int] = field(default_factory=list)


def resolve_step_size(trained: torch.Tensor, step_size: float | None) -> torch.Tensor:
    """The inference alpha: None (or 0) the trained one; 0 < a < 1 a times it; a >= 1 a."""
    trained = trained.detach()
    if step_size is None or step_size == 0:
        return trained
    return trained * step_size if step_size < 1 else torch.full_like(trained, step_size)


def step_options(
    model: EnergyModel,
    step_size: float | None = None,
    langevin_noise: float | None = None,
    accept_lower_energies: bool = False,
) -> StepOptions:
    """How a trained model steps at inference (the one place inference options become
    StepOptions): alpha from model.resolve_step_size(step_size) (None: the trained one), the
    trained Langevin sigma unless `langevin_noise` is given (0: none)."""
    noise = model.langevin_std.detach() if langevin_noise is None else langevin_noise
    return StepOptions(
        step_size=model.resolve_step_size(step_size),
        langevin_std=noise,
        accept_lower_energies=accept_lower_energies,
    )


def cache_of(model: EnergyModel, caches: dict, landscape: int):
    """The context cache steps on `landscape` read (caches[0] when the context does not depend
    on the landscape)."""
    return caches[landscape if model.context_depends_on_landscape else 0]


def step_schedule(
    landscapes: int,
    steps: int = 1,
    random_steps: int = 0,
    random_steps_min: int = 0,
    final_landscape_only: bool = False,
    randomize: bool = False,
) -> list[int]:
    """Landscape index of every step, with the paper's semantics.

    random_steps = R = 0: `steps` steps on each landscape. R > 0 in training (randomize): each
    landscape (or only the last, with final_landscape_only) gets randint(min, R + 2) steps, one
    draw per landscape per batch from torch's global generator. R > 0 at evaluation: earlier
    landscapes one step each, the last R + 1 steps.
    """
    if random_steps <= 0:
        return [landscape for landscape in range(landscapes) for _ in range(steps)]
    low = random_steps_min or 1
    schedule: list[int] = []
    for landscape in range(landscapes):
        last = landscape == landscapes - 1
        if randomize and (last or not final_landscape_only):
            repeats = int(torch.randint(low, random_steps + 2, (1,)).item())
        elif not randomize and last:
            repeats = random_steps + 1
        else:
            repeats = 1
        schedule.extend([landscape] * repeats)
    return schedule


def encode_caches(
    model: EnergyModel, tokens: torch.Tensor | None, schedule: list[int], with_graph: bool
) -> dict:
    """Context caches by landscape for the landscapes of `schedule` (one, keyed 0, when the
    context does not depend on the landscape), with their graph if with_graph. A model with
    `encode_landscapes` encodes them together (the energy transformer: one stacked pass)."""
    landscapes = sorted(set(schedule)) if model.context_depends_on_landscape else [0]
    together = getattr(model, "encode_landscapes", None)
    with torch.set_grad_enabled(with_graph):
        if together is not None:
            return together(tokens, landscapes)
        return {landscape: model.encode_context(tokens, landscape) for landscape in landscapes}


def _check_finite(gradient: torch.Tensor, index: int, landscape: int) -> None:
    # One reduction first (NaN and Inf propagate through a sum); the element-wise test only
    # when the sum is not finite, which a finite gradient reaches only by overflowing. Not in a
    # graph torch.compile captures whole (the test is a host branch on device data).
    if torch.compiler.is_compiling():
        return
    if not torch.isfinite(gradient.sum()) and not torch.isfinite(gradient).all():
        raise ThinkingError(
            f"NaN or Inf in the candidate gradient dE/dp at thinking step {index} "
            f"(landscape {landscape}); the energy has diverged: lower train.lr or "
            "think.step_size, or enable think.grad_clamp"
        )


def take_step(
    model: EnergyModel,
    cache,
    state: torch.Tensor,
    options: StepOptions,
    keep_graph: bool,
    rows: torch.Tensor | None = None,
    where: tuple[int, int] = (0, 0),
    landscape: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step from a raw state (B, R, V for text; B, C, H, W for images): returns (new raw
    state, energies: (B, R) per candidate, or (B,) per image).

    `where` = (step index, landscape) names the step in the error raised on a NaN/Inf gradient.
    `landscape` conditions the candidates (default: the cache's own landscape); a cache whose
    context does not depend on the landscape serves every landscape this way.
    """
    noisy, noise = float(options.langevin_std) > 0, {}
    if noisy and getattr(model, "langevin_after_embedding", False):
        noise = {"langevin_std": options.langevin_std}  # the model adds it to its embedding
    elif noisy:
        state = state + torch.randn_like(state.detach()) * options.langevin_std
    candidates = model.candidate_input(state)  # text: softmax (B, R, V); images, video: as is
    with_gradient = getattr(model, "energies_and_gradient", None)
    if with_gradient is None:
        energies = model.energies(cache, candidates, rows, landscape, **noise)  # (B, R) or (B,)
        (gradient,) = torch.autograd.grad(energies.sum(), candidates, create_graph=keep_graph)
    else:  # the same values; the model may write the gradient out instead of asking autograd
        energies, gradient = with_gradient(cache, candidates, rows, landscape, keep_graph, **noise)
    _check_finite(gradient, *where)
    if options.grad_clamp:
        limit = options.grad_clamp / model.step_size
        gradient = torch.clamp(gradient, min=-limit, max=limit)
    step_size = torch.as_tensor(options.step_size, dtype=gradient.dtype, device=gradient.device)
    new_state = torch.addcmul(candidates, step_size, gradient, value=-1.0)  # x - alpha dE/dx
    if options.absolute_clamp:
        new_state = new_state.clamp(-options.absolute_clamp, options.absolute_clamp)
    if options.accept_lower_energies and not keep_graph:
        new_state = _accept_lower(model, cache, candidates, energies, new_state, rows, landscape)
    return new_state, energies.detach()


@torch.no_grad()
def _accept_lower(model, cache, candidates, energies, proposed, rows, landscape):
    """The paper's accept-lower-energies rule: per candidate keep the proposed state where its
    energy (one extra forward) is below the energy of the state the step started from, else
    fall back to that state's candidate input (a step of size 0 under y' = x - a g)."""
    proposed_energies = model.energies(cache, model.candidate_input(proposed), rows, landscape)
    lower = proposed_energies < energies  # (B, R) or (B,)
    lower = lower.view(*lower.shape, *[1] * (proposed.dim() - lower.dim()))  # broadcastable
    return torch.where(lower, proposed, candidates.detach())


def recomputed_step(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """take_step (same arguments) under non-reentrant activation checkpointing (exact under
    double backward).

    The whole step is the unit: the prediction-stream forward *and* the graph of its candidate
    gradient are dropped after the step and recomputed (same RNG draws) in the final backward.
    Checkpointing single blocks saves next to nothing here, because the create_graph gradient
    keeps the recomputed activations alive until the final backward anyway.
    """

    return checkpoint(take_step, *args, use_reentrant=False, **kwargs)


def _leaf(model: EnergyModel, state: torch.Tensor) -> torch.Tensor:
    """The state cut from its history, as a leaf autograd differentiates the energy by. A model
    that gives its own gradient (energies_and_gradient makes its own leaf where it asks
    autograd) needs none, and inside a whole-step torch.compile graph a requires_grad_() on an
    intermediate cannot be traced."""
    state = state.detach()
    if torch.compiler.is_compiling() and hasattr(model, "energies_and_gradient"):
        return state
    return state.requires_grad_()


def think(
    model: EnergyModel,
    tokens: torch.Tensor | None,
    init: torch.Tensor,
    schedule: list[int],
    options: StepOptions,
    rows: torch.Tensor | None = None,
    caches: dict | None = None,
) -> Trajectory:
    """Optimise candidates init (B, R, V; images B, C, H, W) for the context (tokens (B, S);
    None for a model without a context stream) along `schedule`.

    caches: prebuilt context caches by landscape (e.g. a generation KV cache); then tokens is
    not read. For models whose context does not depend on the landscape, caches[0] serves all.
    """
    trajectory = Trajectory()
    state = init
    if caches is None:
        caches = encode_caches(model, tokens, schedule, options.create_graph)
    last = len(schedule) - 1
    with torch.enable_grad():
        for index, landscape in enumerate(schedule):
            cache = cache_of(model, caches, landscape)
            if options.detach or not options.create_graph or not state.requires_grad:
                state = _leaf(model, state)
            keep_graph = options.create_graph and (not options.truncate or index == last)
            where = (index, landscape)
            step = recomputed_step if options.recompute and keep_graph else take_step
            args = (model, cache, state, options, keep_graph, rows, where, landscape)
            state, energies = step(*args)
            if not options.create_graph:
                state = state.detach()
            trajectory.states.append(state)
            trajectory.energies.append(energies)
            trajectory.landscapes.append(landscape)
    return trajectory
