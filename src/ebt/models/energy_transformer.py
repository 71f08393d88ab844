"""The autoregressive energy transformer with split context / prediction streams.

energy_j = E(x_0..x_j, y_j): candidate j (a distribution over the next token x_{j+1}, or a
predicted next frame) reads the real context up to x_j and itself. The context stream is
computed once per landscape (once per batch when it does not depend on the landscape) and kept
as per-layer keys/values; only the prediction stream is evaluated at every thinking step.

Variants (how the landscape / step id conditions the energy):
- time_embed: a learned step embedding is prepended to the context as an extra token.
- adaln: the step embedding modulates every block (DiT-style shift/scale/gate) and the head.
- default: no conditioning.
- pred_step: the step embedding is added to the candidate embeddings only, so the context stream
  is the same for every step and is computed once per batch.

Inputs: text (frame_dim = 0) embeds token ids with a table and candidate distributions (the
softmax of logits) with a projection; video (frame_dim > 0) embeds real frames and candidate
frames, stepped as they are, with one shared Linear(frame_dim, D) with bias.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ebt.models import candidate_gradient
from ebt.models.context_cache import ContextCache
from ebt.models.energy_plumbing import EnergyPlumbing, autograd_energies_and_gradient
from ebt.nn.attention import prediction_mask
from ebt.nn.block import Block, Rope
from ebt.nn.kv_cache import KeyValueBuffer
from ebt.nn.layers import RMSNorm, RopeTables, init_linear_xavier, modulate
from ebt.nn.precision import no_autograd
from ebt.thinking.loop import Trajectory, resolve_step_size, step_options, step_schedule
from ebt.thinking.loop import think as run_thinking


@dataclass
class EnergyTransformerArgs:
    vocab_size: int
    dim: int
    layers: int
    heads: int
    ffn_dim: int
    max_seq_len: int
    variant: str = "time_embed"
    landscapes: int = 2
    norm_eps: float = 1e-5
    rope_theta: float = 1e4
    step_size: float = 500.0
    step_size_learnable: bool = True
    langevin_noise: float = 0.0
    inference_steps: int = 1  # default steps per landscape for `think`
    frame_dim: int = 0  # 0: text (token ids, vocabulary candidates); > 0: frame vectors
    frame_size: int = 0  # video patch tokens (models.patch_frames): pixels per frame side
    patch_size: int = 0  # 0: one token per frame; > 0: patch tokens of this side


class EnergyTransformer(EnergyPlumbing, nn.Module):
    """Scores (context, candidate distribution) pairs with one scalar energy per position."""

    def __init__(self, args: EnergyTransformerArgs) -> None:
        super().__init__()
        self.args = args
        self.variant = args.variant
        self.init_thinking_parameters(args.step_size, args.step_size_learnable, args.langevin_noise)
        if args.frame_dim:  # one Linear embeds real and candidate frames
            self.frame_embedding = nn.Linear(args.frame_dim, args.dim)
        else:
            self.token_embedding = nn.Embedding(args.vocab_size, args.dim)
            self.candidate_projection = nn.Linear(args.vocab_size, args.dim, bias=False)
        adaln = args.variant == "adaln"
        self.blocks = nn.ModuleList(
            Block(args.dim, args.heads, args.ffn_dim, args.norm_eps, adaln)
            for _ in range(args.layers)
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.energy_head = nn.Linear(args.dim, 1, bias=False)
        init_linear_xavier(self)
        self.hand_written_gradients = True  # see hand_written_path
        self.compiled_passes: dict[str, Callable] = {}  # see compile_training_passes
        self.step_embedding = None
        if args.variant != "default":
            self.step_embedding = nn.Embedding(args.landscapes, args.dim)
        self.final_modulation = None
        if adaln:  # PyTorch's default init for the modulation layers, as the paper's plain adaln
            self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(args.dim, 2 * args.dim))
            for block in self.blocks:
                block.modulation[1].reset_parameters()
        self.offset = 2 if args.variant == "time_embed" else 1
        self.rope = RopeTables(args.dim // args.heads, args.max_seq_len + 2, args.rope_theta)

    @property
    def context_depends_on_landscape(self) -> bool:
        return self.variant in ("time_embed", "adaln")

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    def context_capacity(self, frames: int) -> int:
        """Context-cache positions that `frames` real tokens (frames) take, step token included."""
        return frames + self.offset

    @property
    def candidate_dim(self) -> int:
        """Numbers in one candidate: the vocabulary (text) or a frame vector (video)."""
        return self.args.frame_dim or self.args.vocab_size

    @property
    def candidate_layer(self) -> nn.Linear:
        """The Linear that embeds candidates (its weight carries dE/dx back to them)."""
        return self.frame_embedding if self.args.frame_dim else self.candidate_projection

    @property
    def langevin_after_embedding(self) -> bool:
        """Video adds Langevin noise to the embedded candidates, not to the state (as the
        paper's video code; thinking.take_step asks)."""
        return bool(self.args.frame_dim)

    def embed_context(self, inputs: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) or frames (B, T, frame_dim) -> context-stream inputs (B, T, D)."""
        if self.args.frame_dim:
            return self.frame_embedding(inputs)  # (B, T, D)
        return self.token_embedding(inputs)  # (B, T, D)

    def _rope(self, positions: torch.Tensor) -> Rope:
        return self.rope(positions, self.energy_head.weight.dtype)  # (T, hd/2) complex

    def _condition(self, landscape: int | torch.Tensor, batch: int) -> torch.Tensor:
        if isinstance(landscape, torch.Tensor):  # one landscape per row (B,)
            return self.step_embedding(landscape)  # (B, D)
        return self.step_embedding.weight[landscape].unsqueeze(0).expand(batch, -1)  # (B, D)

    def encode_context(
        self, tokens: torch.Tensor, landscape: int | torch.Tensor = 0, capacity: int = 0
    ) -> ContextCache:
        """Run the context stream over tokens (B, S) (frames: (B, S, frame_dim)); returns
        per-layer keys/values.

        landscape: one for all rows, or a (B,) tensor with one per row (a stacked cache that
        encodes several landscapes in one pass; split it with ContextCache.select). capacity > 0
        keeps the keys/values in KeyValueBuffers of that many positions for extend_context.
        """
        return self._encode_embedded(self.embed_context(tokens), landscape, capacity)

    def encode_landscapes(self, tokens: torch.Tensor, landscapes: list[int]) -> dict:
        """{landscape: ContextCache} for each of `landscapes` over tokens (B, S) (frames
        (B, S, frame_dim)): the inputs are embedded once and every landscape's context stream
        runs in one pass over the landscapes' rows stacked (larger matmuls, fewer kernels). The
        caches are pieces of one split, whose backward is a single concatenation."""
        if not self.context_depends_on_landscape:
            return {0: self.encode_context(tokens, 0)}
        if len(landscapes) == 1:
            return {landscapes[0]: self.encode_context(tokens, landscapes[0])}
        batch = tokens.shape[0]
        x = self.embed_context(tokens).repeat(len(landscapes), 1, 1)  # (L * B, S, D)
        labels = torch.tensor(landscapes, device=x.device).repeat_interleave(batch)  # (L * B,)
        stacked = self._encode_embedded(x, labels)
        keys = [k.split(batch) for k in stacked.keys]  # per layer, L x (B, H, T, hd)
        values = [v.split(batch) for v in stacked.values]
        conditions = [None] * len(landscapes)
        if stacked.condition is not None:
            conditions = stacked.condition.split(batch)  # L x (B, D)
        return {
            landscape: ContextCache(
                [k[index] for k in keys], [v[index] for v in values], landscape, conditions[index]
            )
            for index, landscape in enumerate(landscapes)
        }

    def _encode_embedded(
        self, x: torch.Tensor, landscape: int | torch.Tensor, capacity: int = 0
    ) -> ContextCache:
        """encode_context on embedded inputs x (B, S, D)."""
        batch = x.shape[0]
        condition = self._condition(landscape, batch) if self.variant == "adaln" else None
        if self.variant == "time_embed":
            step_token = self._condition(landscape, batch).unsqueeze(1)  # (B, 1, D)
            x = torch.cat((step_token, x), dim=1)  # (B, S + 1, D)
        rope = self._rope(torch.arange(x.shape[1], device=x.device)).unsqueeze(1)  # (T, 1, hd/2)
        context_layers = self._training_pass("context", type(self)._context_layers)
        keys, values = context_layers(self, x, rope, condition)
        label = landscape if isinstance(landscape, int) else -1
        cache = ContextCache(keys, values, label, condition)
        if capacity:
            cache.buffers = [
                KeyValueBuffer(k, v, capacity) for k, v in zip(keys, values, strict=True)
            ]
        return cache

    def _context_layers(
        self, x: torch.Tensor, rope: Rope, condition: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer keys and values (B, H, T, hd) of the context stream over inputs x (B, T, D)."""
        keys, values = [], []
        for index, block in enumerate(self.blocks):
            x, k, v = block.context(x, rope, condition, keys_only=index == len(self.blocks) - 1)
            keys.append(k)
            values.append(v)
        return keys, values

    def compile_training_passes(self) -> None:
        """torch.compile the two passes a training step runs (train.compile): the context stream
        and the written-out energies + dE/dp, whose graph autograd differentiates once (so the
        compiled region has an ordinary first-order backward; a `create_graph` double backward
        cannot be compiled). Fused elementwise kernels; the same arithmetic.

        Used only while grad is enabled (training steps): evaluation, thinking at inference and
        generation, whose shapes change token by token, stay eager. Shapes are static: one
        compilation per landscape and batch shape. The compiled functions take the model as an
        argument (not bound methods), so a deep copy of the model runs its own weights.
        """
        self.compiled_passes = {
            "context": torch.compile(EnergyTransformer._context_layers, dynamic=False),
            "gradient": torch.compile(candidate_gradient.energies_and_gradient, dynamic=False),
        }

    def _training_pass(self, name: str, eager: Callable) -> Callable:
        """The compiled version of a pass while training, if compile_training_passes ran."""
        return self.compiled_passes.get(name, eager) if torch.is_grad_enabled() else eager

    @torch.no_grad()
    def extend_context(self, cache: ContextCache, tokens: torch.Tensor) -> ContextCache:
        """Append tokens (B, T) (frames (B, T, frame_dim)) to a context cache: the KV cache of
        generation (no gradients).

        Equals encode_context on the concatenated tokens (up to float rounding) and costs a
        context pass over the new tokens only. The keys/values are written in place into the
        cache's buffers (made on first use; copied if `cache` is not their newest view).
        """
        start = cache.length
        buffers = cache.buffers
        if buffers is None or buffers[0].length != start:  # none yet, or a fork of an old view
            buffers = [KeyValueBuffer(k, v) for k, v in zip(cache.keys, cache.values, strict=True)]
        if tokens.shape[1] == 1 and self.hand_written_path(self.energy_head.weight):
            candidate_gradient.extend_context_by_one(self, buffers, cache.condition, tokens)
            views = [buffer.views() for buffer in buffers]
            keys, values = [k for k, _ in views], [v for _, v in views]
            return ContextCache(keys, values, cache.landscape, cache.condition, buffers)
        x = self.embed_context(tokens)  # (B, T, D)
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        rope = self._rope(positions).unsqueeze(1)  # (T, 1, hd/2)
        keys, values = [], []
        for index, (block, buffer) in enumerate(zip(self.blocks, buffers, strict=True)):
            last = index == len(self.blocks) - 1
            x, k, v = block.context(x, rope, cache.condition, keys_only=last, past=buffer)
            keys.append(k)
            values.append(v)
        return ContextCache(keys, values, cache.landscape, cache.condition, buffers)

    def candidate_input(self, state: torch.Tensor) -> torch.Tensor:
        """What the energy reads of a raw state (B, R, V) of logits: their softmax (B, R, V);
        a frame state (B, R, frame_dim) is read as it is."""
        if self.args.frame_dim:
            return state
        return state.softmax(dim=-1)

    def embed_candidates(
        self,
        probabilities: torch.Tensor,
        landscape: int,
        noise: torch.Tensor | None = None,
        zero_leaf_as_bias: bool = False,
    ) -> torch.Tensor:
        """Candidates (B, R, V or frame_dim) -> prediction-stream inputs (B, R, D), plus the
        Langevin `noise` (B, R, D) drawn after the embedding (video), if any.

        zero_leaf_as_bias (the hand-written passes, which never ask autograd for dE/dp): frame
        candidates that are a leaf of zeros (think.init = "zeros") embed as the bias alone,
        skipping a (B*R, F) x (F, D) matmul and a weight gradient that is exactly zero
        (grad^T 0). Checked on CPU only, where it saves ~3% of a video training step; on GPU
        the check would make the host wait for the device.
        """
        if zero_leaf_as_bias and self._zero_frames(probabilities):
            bias = self.frame_embedding.bias  # (D,)
            z = bias.expand(*probabilities.shape[:2], -1)  # (B, R, D)
        else:
            z = self.candidate_layer(probabilities)  # (B, R, D)
        if noise is not None:
            z = z + noise
        if self.variant == "pred_step":
            z = z + self.step_embedding.weight[landscape]
        return z

    def _zero_frames(self, candidates: torch.Tensor) -> bool:
        """Whether candidates are frame vectors, a leaf (no history a gradient must reach)
        on CPU, and all zero."""
        eligible = self.args.frame_dim and candidates.is_leaf and candidates.device.type == "cpu"
        return bool(eligible) and not torch.compiler.is_compiling() and not candidates.any()

    def energies(
        self,
        cache: ContextCache,
        probabilities: torch.Tensor,
        rows: torch.Tensor | None = None,
        landscape: int | None = None,
        langevin_std: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Energy (B, R) of candidate distributions (B, R, V) (or frames (B, R, frame_dim))
        against a context cache.

        rows[r] is the index of the context token whose successor candidate r predicts
        (default: 0..R-1, one candidate per context position). landscape conditions the
        candidates (pred_step); default the cache's. For time_embed / adaln the context itself
        depends on the landscape, so the cache must have been encoded on it. langevin_std:
        Gaussian noise of that std added to the embedded candidates (video's Langevin step).
        """
        causal_offset = self.offset if rows is None else None  # rows 0..R-1: strictly causal
        if rows is None:
            rows = torch.arange(probabilities.shape[1], device=probabilities.device)
        landscape = cache.landscape if landscape is None else landscape
        noise = self._embedding_noise(probabilities, langevin_std)
        z = self.embed_candidates(probabilities, landscape, noise)  # (B, R, D)
        head_dim = self.args.dim // self.args.heads
        rope = self._rope(rows + self.offset).unsqueeze(1) * head_dim**-0.5  # (R, 1, hd/2)
        mask = prediction_mask(rows, cache.keys[0].shape[2], self.offset, z.dtype)  # (R, Tc)
        for block, k, v in zip(self.blocks, cache.keys, cache.values, strict=True):
            z = block.prediction(z, rope, cache.condition, (k, v), mask, causal_offset)
        z = self.norm(z)
        if self.final_modulation is not None:
            shift, scale = self.final_modulation(cache.condition).chunk(2, dim=-1)  # (B, D) each
            z = modulate(z, shift, scale)
        return self.energy_head(z).squeeze(-1)  # (B, R)

    def _embedding_noise(
        self, candidates: torch.Tensor, langevin_std: float | torch.Tensor | None
    ) -> torch.Tensor | None:
        """Langevin noise (B, R, D) for embedded candidates (B, R, ...), or None."""
        if langevin_std is None:
            return None
        shape = (*candidates.shape[:2], self.args.dim)
        noise = torch.randn(shape, dtype=candidates.dtype, device=candidates.device)
        return noise * langevin_std  # (B, R, D)

    def head_weight(self) -> torch.Tensor:
        """The energy head's weight (hand_written_path: is it an ordinary parameter?)."""
        return self.energy_head.weight

    def written_out_pass(self) -> Callable:
        """The function computing the written-out (energies, dE/dx): candidate_gradient's
        (patch-token video: patch_gradient's)."""
        return candidate_gradient.energies_and_gradient

    def energies_and_gradient(
        self,
        cache: ContextCache,
        probabilities: torch.Tensor,
        rows: torch.Tensor | None = None,
        landscape: int | None = None,
        create_graph: bool = False,
        langevin_std: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(energies (B, R), dE/dp (B, R, V or frame_dim)); arguments as energies().

        create_graph=False: first order, detached (inference). create_graph=True: both carry
        their graph, so a loss on a step taken with dE/dp back-propagates the second-order
        terms into the parameters (training).

        Hand-written (see candidate_gradient) where hand_written_path() allows, also under
        bf16 autocast; otherwise (a model cast to bf16, sharded FSDP parameters) autograd, with
        create_graph for training.
        """
        if self.hand_written_path(probabilities):
            noise = self._embedding_noise(probabilities, langevin_std)  # None for text
            eager = self.written_out_pass()
            if create_graph:  # autograd records the written-out gradient
                written_out = self._training_pass("gradient", eager)
                return written_out(self, cache, probabilities, rows, landscape, noise)
            with no_autograd():  # inference_mode, or no_grad inside a traced graph
                energies, gradient = eager(
                    self, cache, probabilities.detach(), rows, landscape, noise
                )  # inference tensors: clone for use where autograd records (a learnable alpha)
            return energies.clone(), gradient.clone()

        def energy(candidates: torch.Tensor) -> torch.Tensor:
            return self.energies(cache, candidates, rows, landscape, langevin_std)  # (B, R)

        return autograd_energies_and_gradient(energy, probabilities, create_graph, False)

    def resolve_step_size(self, step_size: float | None) -> torch.Tensor:
        """None: the trained alpha; 0 < a < 1: a times the trained alpha; a >= 1: a itself."""
        return resolve_step_size(self.step_size, step_size)

    def think(
        self,
        tokens: torch.Tensor,
        init: torch.Tensor | None = None,
        *,
        steps: int | None = None,
        step_size: float | None = None,
        langevin_noise: float | None = None,
        accept_lower_energies: bool = False,
        rows: torch.Tensor | None = None,
        caches: dict[int, ContextCache] | None = None,
    ) -> Trajectory:
        """Optimise next-token candidates for every position of tokens (B, S) at inference
        (video: next-frame candidates (B, S, frame_dim) after frames (B, S, frame_dim)).

        init: starting logits (B, S, V), default N(0, 1). steps: steps per landscape (default:
        the trained recipe's). step_size: None the trained alpha, 0 < a < 1 that fraction of
        it, a >= 1 the absolute alpha. langevin_noise: default the trained sigma; 0 turns it off.
        accept_lower_energies: keep each step only where it lowers the energy (costs a forward).
        Returns a Trajectory: states[k] raw logits after step k, energies[k] (B, S) the energy of
        the state step k starts from. rows: optimise only the candidates for these positions
        (e.g. the last one when generating); init is then (B, len(rows), V). caches: context
        caches by landscape to think against instead of encoding tokens (see extend_context).
        """
        if init is None:
            count = tokens.shape[1] if rows is None else rows.shape[0]
            shape = (tokens.shape[0], count, self.candidate_dim)  # (B, R, V or frame_dim)
            init = torch.randn(shape, device=tokens.device)
        schedule = step_schedule(self.args.landscapes, steps or self.args.inference_steps)
        options = step_options(self, step_size, langevin_noise, accept_lower_energies)
        return run_thinking(self, tokens, init, schedule, options, rows, caches)
