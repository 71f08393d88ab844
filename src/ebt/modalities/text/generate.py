"""Text generation for both model kinds, with a KV cache.

The EBT keeps one context cache per landscape (one in all for `pred_step` / `default`); each new
token extends every cache by one position and only the newest position's candidate is optimised.
Transformer++ gets the same cached generator, so the two compare fairly. `cached=False` is the
recompute-everything path (the paper's generator: the whole window is re-run and, for the EBT,
every position re-optimised for every token), kept for tests and `ebt bench generate`.
Beyond the context window both paths read the same sliding window (`visible_length`): the
newest half window, growing back to the full window one token at a time, then again the newest
half; the cache is rebuilt only when the window restarts, so the two agree token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ebt.errors import ConfigError
from ebt.modalities.text.graph_decoding import GraphDecoding, TransformerGraphDecoding
from ebt.models import TransformerPP
from ebt.thinking.halting import think_until_converged
from ebt.thinking.loop import InferenceOptions


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    steps: int | None = None  # EBT thinking steps per landscape (None: the trained recipe's)
    thinking: InferenceOptions = field(default_factory=InferenceOptions)  # EBT step size, noise
    halt_tolerance: float | None = None  # EBT: stop a token's thinking when |dE| < this
    graphs: bool = False  # EBT: the decoding step as one compiled graph (see graph_decoding)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Greedy at temperature 0, else a draw from the top-k / top-p tempered distribution."""
    logits = logits.float().reshape(-1)
    if sampling.temperature <= 0:
        return int(logits.argmax())
    if sampling.top_k > 0:
        threshold = logits.topk(min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probabilities = (logits / sampling.temperature).softmax(-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probabilities.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p > sampling.top_p  # keep the top-p nucleus
        probabilities = probabilities.scatter(0, order, sorted_p.masked_fill(outside, 0.0))
    return int(torch.multinomial(probabilities, 1, generator=generator))


def visible_length(total: int, window: int) -> int:
    """How many of the newest of `total` tokens the next prediction reads: all of them within
    the window; past it the newest max(window // 2, 1), then one more per token up to `window`,
    then the newest half again (a function of `total` only, so any prompt length agrees with
    having generated it token by token)."""
    if total <= window:
        return total
    half = max(window // 2, 1)
    return half + (total - window - 1) % (window - half + 1)


class Decoder:
    """Next-token logits for a growing sequence, cached or recomputed from scratch."""

    def __init__(self, model: torch.nn.Module, window: int, cached: bool = True) -> None:
        self.model, self.window, self.cached = model, window, cached
        self.ids: list[int] = []
        self.state = None  # EBT: stacked ContextCache; Transformer++: per-layer KeyValueBuffers
        self.cached_length = 0
        self.energy: float | None = None  # EBT: energy of the last step's starting state
        self.steps: int | None = None  # EBT: thinking steps the last token took
        self.graph: GraphDecoding | TransformerGraphDecoding | None = None  # Sampling.graphs

    def _landscapes(self) -> list[int]:
        model = self.model
        return list(range(model.args.landscapes)) if model.context_depends_on_landscape else [0]

    @torch.no_grad()
    def _advance(self, new: list[int], device: torch.device) -> torch.Tensor | None:
        """Bring the cache up to date with self.ids; returns Transformer++ logits if computed.

        The EBT's landscapes share one stacked cache (one batch row per landscape), so a new
        token extends all of them in one context pass.
        """
        tokens = torch.tensor([new], device=device)  # (1, T)
        if isinstance(self.model, TransformerPP):
            capacity = self.window
            logits, self.state = self.model.forward_cached(tokens, self.state, capacity)
            return logits[:, -1]
        landscapes = self._landscapes()
        stacked = tokens.expand(len(landscapes), -1)  # (L, T)
        if self.state is None:
            capacity = self.window + self.model.offset
            labels = torch.tensor(landscapes, device=device)  # (L,)
            self.state = self.model.encode_context(stacked, labels, capacity)
        else:
            self.state = self.model.extend_context(self.state, stacked)
        return None

    def _caches(self) -> dict:
        """The stacked cache's rows, one cache per landscape."""
        landscapes = self._landscapes()
        return {lv: self.state.select(slice(i, i + 1), lv) for i, lv in enumerate(landscapes)}

    def _refresh(self, device: torch.device) -> torch.Tensor | None:
        visible = visible_length(len(self.ids), self.window)
        if self.state is None or visible != self.cached_length + 1:  # (re)build the window
            self.state, self.cached_length = None, visible
            return self._advance(self.ids[-visible:], device)
        self.cached_length = visible
        return self._advance(self.ids[-1:], device)

    def next_logits(self, sampling: Sampling) -> torch.Tensor:
        """Logits (1, V) for the token after self.ids."""
        device = next(self.model.parameters()).device
        if not self.cached:
            return self._recompute(device, sampling)
        if sampling.graphs:
            return self._graph_logits(sampling, device)
        logits = self._refresh(device)
        if logits is not None:
            return logits
        row = torch.tensor([self.cached_length - 1], device=device)
        init = torch.randn(1, 1, self.model.vocab_size, device=device)
        if sampling.halt_tolerance is not None:
            return self._think_adaptively(sampling, init, row)
        arguments = sampling.thinking.think_arguments()
        trajectory = self.model.think(
            None, init, steps=sampling.steps, rows=row, caches=self._caches(), **arguments
        )
        self.energy = float(trajectory.energies[-1][0, -1])
        self.steps = len(trajectory.states)
        return trajectory.states[-1][:, -1]

    def _graph_logits(self, sampling: Sampling, device: torch.device) -> torch.Tensor:
        """The cached path's logits from the compiled fixed-shape step (the same window
        restarts; the starting logits drawn here, in the same order)."""
        if sampling.halt_tolerance is not None:
            raise ConfigError("--graphs does not combine with --halt-tolerance")
        visible = visible_length(len(self.ids), self.window)
        restart = self.graph is None or visible != self.cached_length + 1
        self.cached_length = visible
        if isinstance(self.model, TransformerPP):
            if self.graph is None:
                self.graph = TransformerGraphDecoding(self.model, self.window)
            if restart:
                return self.graph.restart(self.ids[-visible:], device)
            return self.graph.next(self.ids[-1], device)
        if self.graph is None:
            self.graph = GraphDecoding(self.model, self.window, sampling.steps, sampling.thinking)
        init = torch.randn(1, 1, self.model.vocab_size, device=device)
        if restart:
            logits, energy = self.graph.restart(self.ids[-visible:], init)
        else:
            logits, energy = self.graph.next(self.ids[-1], init)
        self.energy, self.steps = float(energy[0]), self.graph.steps
        return logits

    def _think_adaptively(self, sampling: Sampling, init: torch.Tensor, row: torch.Tensor):
        """The newest position thinks until its energy stops moving (adaptive halting)."""
        sampling.thinking.check_halting(sampling.halt_tolerance)
        steps = sampling.steps or self.model.args.inference_steps
        options = sampling.thinking
        result = think_until_converged(
            self.model,
            self._caches(),
            init,
            row,
            steps,
            sampling.halt_tolerance,
            options.step_size,
            options.langevin_noise,
        )
        self.energy, self.steps = float(result.energies[0, -1]), int(result.steps[0, -1])
        return result.logits[:, -1]

    def _recompute(self, device: torch.device, sampling: Sampling) -> torch.Tensor:
        visible = visible_length(len(self.ids), self.window)
        tokens = torch.tensor([self.ids[-visible:]], device=device)  # (1, T)
        if isinstance(self.model, TransformerPP):
            with torch.no_grad():
                return self.model(tokens)[:, -1]
        # Positions are independent, so only the last one's start matters: draw it exactly as
        # the cached path does, and start the others (whose results are discarded) from zeros.
        last = torch.randn(1, 1, self.model.vocab_size, device=device)
        rest = torch.zeros(1, tokens.shape[1] - 1, self.model.vocab_size, device=device)
        init = torch.cat((rest, last), dim=1)  # (1, T, V)
        arguments = sampling.thinking.think_arguments()
        trajectory = self.model.think(tokens, init, steps=sampling.steps, **arguments)
        self.energy = float(trajectory.energies[-1][0, -1])
        self.steps = len(trajectory.states)
        return trajectory.states[-1][:, -1]


def generate_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    window: int,
    sampling: Sampling | None = None,
    seed: int = 0,
    cached: bool = True,
    records: list[dict] | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one; `records` (if given) receives {"id", "energy", "steps"}
    per token (EBT: the energy of the state the last thinking step started from and the steps
    taken; else None)."""
    sampling = sampling or Sampling()
    decoder = Decoder(model, window, cached)
    decoder.ids = list(prompt_ids)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for _ in range(max_new_tokens):
        token = sample(decoder.next_logits(sampling).cpu(), sampling, generator)
        decoder.ids.append(token)
        if records is not None:
            records.append({"id": token, "energy": decoder.energy, "steps": decoder.steps})
        yield token


def generate(
    run,
    prompt: str,
    max_new_tokens: int = 200,
    sampling: Sampling | None = None,
    seed: int = 0,
    stop: list[str] | None = None,
    records: list[dict] | None = None,
) -> Iterator[str]:
    """Yield text pieces of a loaded run's continuation of `prompt`, stopping at a stop string;
    `records` as in generate_ids."""
    tokenizer = run.tokenizer
    ids = tokenizer.encode(prompt) or [tokenizer.pad_id]
    new: list[int] = []
    shown = ""
    window = run.config.data.seq_len
    stream = generate_ids(run.model, ids, max_new_tokens, window, sampling, seed, True, records)
    for token in stream:
        new.append(token)
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):  # wait for a complete UTF-8 character
            continue
        cut = min((text.find(s) for s in stop or [] if s in text), default=-1)
        if cut >= 0:
            yield text[len(shown) : cut]
            return
        yield text[len(shown) :]
        shown = text
