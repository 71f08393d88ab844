"""The context stream's kept keys and values: what every thinking step of a landscape reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ebt.nn.kv_cache import KeyValueBuffer


@dataclass
class ContextCache:
    """Per-layer context keys/values (B, H, Tc, hd) for one landscape, plus its condition.

    buffers (generation only): the in-place storage the keys/values view, which extend_context
    appends to. A stacked cache (see encode_context) holds several landscapes' rows; `select`
    views one of them.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    landscape: int
    condition: torch.Tensor | None  # (B, D) for adaln, else None
    buffers: list[KeyValueBuffer] | None = None

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def select(self, rows: slice | torch.Tensor, landscape: int) -> ContextCache:
        """The batch rows `rows` of a stacked cache, as a cache of `landscape`: a slice gives
        views, an index tensor (A,) copies (rows may repeat, e.g. one per best-of-N start)."""
        condition = None if self.condition is None else self.condition[rows]
        keys = [k[rows] for k in self.keys]
        return ContextCache(keys, [v[rows] for v in self.values], landscape, condition)
