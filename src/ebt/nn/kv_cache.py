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


class StaticKeyValueBuffer:
    """One layer's keys and values in fixed (B, H, capacity, hd) storage, written at a position
    tensor: every view has the full capacity, so a decoding step has the same shapes token after
    token and traces (and replays as a CUDA graph) once. Readers mask the positions after the
    filled ones (`position_mask`). Zero-filled: a masked score or weight meets finite numbers
    only (0 x NaN from uninitialised memory would poison the attention)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        batch, heads, length, head_dim = keys.shape  # (B, H, T, hd)
        with torch.inference_mode(False), torch.no_grad():
            self.keys = keys.new_zeros(batch, heads, capacity, head_dim)  # (B, H, C, hd)
            self.values = values.new_zeros(batch, heads, capacity, head_dim)  # (B, H, C, hd)
            self.keys[:, :, :length] = keys
            self.values[:, :, :length] = values

    def refill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Start over from keys/values (B, H, T, hd) in the same storage (its address stays:
        a captured CUDA graph keeps writing and reading it)."""
        length = keys.shape[2]
        with torch.inference_mode(False), torch.no_grad():
            self.keys[:, :, length:].zero_()
            self.values[:, :, length:].zero_()
            self.keys[:, :, :length] = keys
            self.values[:, :, :length] = values

    def write(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor):
        """Write one position's keys/values (B, H, 1, hd) at position (1,); the full storage
        (B, H, C, hd) each."""
        self.keys.index_copy_(2, position, keys)
        self.values.index_copy_(2, position, values)
        return self.keys, self.values

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values


def position_mask(position: torch.Tensor, capacity: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (1, capacity): 0 for the keys up to position (1,), -inf after it."""
    keys = torch.arange(capacity, device=position.device)  # (C,)
    mask = torch.zeros(1, capacity, dtype=dtype, device=position.device)
    return mask.masked_fill((keys > position).unsqueeze(0), float("-inf"))  # (1, C)
