"""Per-layer key/value storage for generation that grows in place."""

from __future__ import annotations

import torch


class KeyValueBuffer:
    """One layer's keys and values in preallocated (B, H, capacity, hd) storage.

    `append` writes new positions after the filled ones and returns views of everything filled,
    so a generated token costs a write of its own keys/values rather than a copy of the whole
    cache (torch.cat). Views handed out earlier stay valid: filled positions are never rewritten.
    Inference only: writes happen in place, so no gradient flows through the buffer.

    The storage is always an ordinary tensor, also when made or grown under inference_mode (the
    one-token context pass runs there): an inference tensor could not be appended to later
    outside inference_mode (e.g. by a multi-token extension after one-token ones).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int = 0) -> None:
        batch, heads, length, head_dim = keys.shape  # (B, H, T, hd)
        capacity = max(capacity, length)
        with torch.inference_mode(False), torch.no_grad():
            self.keys = keys.new_empty(batch, heads, capacity, head_dim)  # (B, H, C, hd)
            self.values = values.new_empty(batch, heads, capacity, head_dim)  # (B, H, C, hd)
            self.keys[:, :, :length] = keys
            self.values[:, :, :length] = values
        self.length = length

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write keys/values (B, H, T, hd) after the filled positions; views (B, H, P + T, hd)."""
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            self._grow(max(end, 2 * self.keys.shape[2]))
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.views()

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, length, hd) of the filled positions."""
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def _grow(self, capacity: int) -> None:
        grown = KeyValueBuffer(
            self.keys[:, :, : self.length], self.values[:, :, : self.length], capacity
        )
        self.keys, self.values = grown.keys, grown.values
