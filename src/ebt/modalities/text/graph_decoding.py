"""Generation's per-token decoding step as ONE graph at fixed shapes (`ebt generate --graphs`).

The eager cached decoder's shapes change every token (its KV cache views grow by one position),
it reads the device for the Langevin sigma at every thinking step and it runs the inference
gradient under inference_mode: none of that traces into one graph. Here instead

- the context keys/values live in fixed-capacity StaticKeyValueBuffers (window + the model's
  offset positions), written at a position tensor; the context pass and the prediction stream
  read the whole capacity, the positions after the newest masked (-inf scores: weight 0);
- the Langevin sigma is read once per generation (a Python constant of the compiled step);
- the written-out gradient runs under no_grad inside the trace (`ebt.nn.precision.no_autograd`),
  on the explicit (not the fused) prediction attention.

One step = extend the stacked context (every landscape's row) by the newest token + the whole
thinking schedule for the newest position; it is compiled with `fullgraph=True` (a graph break
is an error, not a silent slowdown), with mode="reduce-overhead" on CUDA so that it replays as
a CUDA graph. A window restart (every window // 2 tokens past the window) re-encodes the visible
tokens eagerly and thinks eagerly on the same static buffers: a prefill, whose shape varies.
The starting logits are drawn outside the graph, so the random stream equals the eager path's.
Transformer++ gets the same fixed-capacity cache and one-graph step (`TransformerGraphDecoding`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ebt.errors import ConfigError
from ebt.models.candidate_gradient import extend_context_by_one
from ebt.models.context_cache import ContextCache
from ebt.models.energy_transformer import EnergyTransformer
from ebt.models.transformer_pp import TransformerPP
from ebt.nn.kv_cache import StaticKeyValueBuffer
from ebt.thinking.loop import InferenceOptions, StepOptions, step_options, step_schedule
from ebt.thinking.loop import think as run_thinking


def graph_step_options(model: EnergyTransformer, thinking: InferenceOptions) -> StepOptions:
    """The inference StepOptions with the Langevin sigma a Python number (one device read per
    generation instead of one per thinking step; the same value)."""
    noise = thinking.langevin_noise
    if noise is None:
        noise = float(model.langevin_std.detach())
    return step_options(model, thinking.step_size, noise, thinking.accept_lower_energies)


def think_newest(
    model: EnergyTransformer,
    buffers: list[StaticKeyValueBuffer],
    condition: torch.Tensor | None,
    row: torch.Tensor,
    init: torch.Tensor,
    schedule: list[int],
    options: StepOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (1, V), energy (1,)) of the newest position `row` (1,) thought along `schedule`
    from init (1, 1, V) against the static buffers' stacked rows (one per landscape)."""
    landscapes = sorted(set(schedule)) if model.context_depends_on_landscape else [0]
    caches = {}
    for index, landscape in enumerate(landscapes):
        rows = slice(index, index + 1)
        keys = [buffer.keys[rows] for buffer in buffers]  # per layer (1, H, C, hd)
        values = [buffer.values[rows] for buffer in buffers]
        row_condition = None if condition is None else condition[rows]  # (1, D)
        caches[landscape] = ContextCache(keys, values, landscape, row_condition)
    trajectory = run_thinking(model, None, init, schedule, options, row, caches)
    return trajectory.states[-1][:, -1], trajectory.energies[-1][0, -1:]


def decoding_step(
    model: EnergyTransformer,
    buffers: list[StaticKeyValueBuffer],
    condition: torch.Tensor | None,
    tokens: torch.Tensor,
    position: torch.Tensor,
    init: torch.Tensor,
    schedule: list[int],
    options: StepOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One generated token's step: write tokens (L, 1) (the newest token, one row per landscape)
    into the buffers at position (1,), then think for its successor; (logits (1, V), energy (1,)).
    Every shape is fixed by the model, the window and the schedule, never by the position."""
    extend_context_by_one(model, buffers, condition, tokens, position)
    row = position + 1 - model.offset  # (1,): the newest token's candidate row
    return think_newest(model, buffers, condition, row, init, schedule, options)


def transformer_step(
    model: TransformerPP,
    buffers: list[StaticKeyValueBuffer],
    tokens: torch.Tensor,
    position: torch.Tensor,
) -> torch.Tensor:
    """Transformer++'s decoding step: logits (1, V) of the token (1, 1) written at position."""
    return model.forward_static(tokens, buffers, position)[:, -1]


def compile_step(step: Callable, device: torch.device) -> Callable:
    """A decoding step compiled as one graph; replayed as a CUDA graph on CUDA."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(step, fullgraph=True, dynamic=False, mode=mode)


def run_compiled(step: Callable, *args) -> tuple[torch.Tensor, ...]:
    """The compiled step's outputs, cloned (a CUDA graph replay overwrites its previous
    outputs); a graph break (or a guard on device data) under fullgraph is one line."""
    try:
        outputs = step(*args)
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(
            f"--graphs: the decoding step does not trace as one graph ({first}); "
            "generate without --graphs"
        ) from error
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return tuple(output.clone() for output in outputs)


def fill_buffers(
    buffers: list[StaticKeyValueBuffer], keys: list, values: list, capacity: int
) -> list[StaticKeyValueBuffer]:
    """Static buffers holding per-layer keys/values (B, H, T, hd): made once per generation,
    refilled in place on a restart (fixed addresses: the compiled step and its CUDA graph
    write them in place)."""
    if buffers:
        for buffer, k, v in zip(buffers, keys, values, strict=True):
            buffer.refill(k, v)
        return buffers
    buffers = [StaticKeyValueBuffer(k, v, capacity) for k, v in zip(keys, values, strict=True)]
    if keys[0].device.type == "cuda":
        for buffer in buffers:
            torch._dynamo.mark_static_address(buffer.keys)
            torch._dynamo.mark_static_address(buffer.values)
    return buffers


class GraphDecoding:
    """The static context of one generation and its compiled decoding step."""

    def __init__(self, model: EnergyTransformer, window: int, steps: int | None, thinking):
        self.model = model
        self.capacity = window + model.offset
        self.schedule = step_schedule(model.args.landscapes, steps or model.args.inference_steps)
        self.options = graph_step_options(model, thinking)
        self.landscapes = list(range(model.args.landscapes))
        if not model.context_depends_on_landscape:
            self.landscapes = [0]
        self.buffers: list[StaticKeyValueBuffer] = []
        self.condition: torch.Tensor | None = None
        self.length = 0  # filled context positions (the step token included)
        self.step = compile_step(decoding_step, next(model.parameters()).device)

    @property
    def steps(self) -> int:
        return len(self.schedule)

    @torch.no_grad()
    def restart(self, tokens: list[int], init: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode the visible tokens into fresh static buffers and think for the newest one,
        eagerly (a prefill: its length varies); (logits (1, V), energy (1,))."""
        device = init.device
        stacked = torch.tensor([tokens], device=device).expand(len(self.landscapes), -1)  # (L, T)
        labels = torch.tensor(self.landscapes, device=device)  # (L,)
        cache = self.model.encode_context(stacked, labels)
        self.buffers = fill_buffers(self.buffers, cache.keys, cache.values, self.capacity)
        self.condition, self.length = cache.condition, cache.length
        row = torch.tensor([len(tokens) - 1], device=device)  # (1,)
        args = (self.buffers, self.condition, row, init, self.schedule, self.options)
        return think_newest(self.model, *args)

    def next(self, token: int, init: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend by `token` and think for its successor in the compiled step; (logits (1, V),
        energy (1,)), cloned (a CUDA graph replay overwrites its previous outputs)."""
        device = init.device
        position = torch.tensor([self.length], device=device)  # (1,)
        tokens = torch.tensor([[token]], device=device).expand(len(self.landscapes), 1)  # (L, 1)
        args = (self.buffers, self.condition, tokens, position, init, self.schedule, self.options)
        logits, energy = run_compiled(self.step, self.model, *args)
        self.length += 1
        return logits, energy


class TransformerGraphDecoding:
    """Transformer++'s twin: the static cache of one generation and its compiled step."""

    def __init__(self, model: TransformerPP, window: int) -> None:
        self.model, self.capacity = model, window
        self.buffers: list[StaticKeyValueBuffer] = []
        self.length = 0  # filled positions
        self.step = compile_step(transformer_step, next(model.parameters()).device)

    @torch.no_grad()
    def restart(self, tokens: list[int], device: torch.device) -> torch.Tensor:
        """Encode the visible tokens into the static cache, eagerly; logits (1, V)."""
        ids = torch.tensor([tokens], device=device)  # (1, T)
        logits, cache = self.model.forward_cached(ids, None, len(tokens))
        views = [buffer.views() for buffer in cache]
        keys, values = [k for k, _ in views], [v for _, v in views]
        self.buffers = fill_buffers(self.buffers, keys, values, self.capacity)
        self.length = len(tokens)
        return logits[:, -1]

    @torch.no_grad()
    def next(self, token: int, device: torch.device) -> torch.Tensor:
        """Logits (1, V) after `token`, from the compiled step."""
        position = torch.tensor([self.length], device=device)  # (1,)
        tokens = torch.tensor([[token]], device=device)  # (1, 1)
        (logits,) = run_compiled(self.step, self.model, self.buffers, tokens, position)
        self.length += 1
        return logits
