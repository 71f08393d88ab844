"""The System-2 replay buffer: replayed rows continue optimising from where they stopped.

Per process (per rank), as in the paper's code: a FIFO of (tokens (S+1,), final state (S, V))
records. Each training batch appends min(fraction * B, len) records sampled without replacement
after the fresh rows; their initial candidates are the stored final states. Only the fresh rows'
final states are stored afterwards.
"""

from __future__ import annotations

from collections import deque

import torch


class ReplayBuffer:
    def __init__(self, max_size: int, sample_size: int) -> None:
        self.max_size = max_size
        self.sample_size = sample_size
        self.tokens: deque[torch.Tensor] = deque(maxlen=max_size)  # each (S + 1,)
        self.states: deque[torch.Tensor] = deque(maxlen=max_size)  # each (S, V)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend_batch(self, fresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fresh batch (B, S+1) -> (fresh + replayed rows, replayed initial states or None)."""
        count = min(self.sample_size, len(self))
        if count == 0:
            return fresh, None
        picks = torch.randperm(len(self))[:count].tolist()
        tokens = torch.stack([self.tokens[i] for i in picks]).to(fresh.device)  # (n, S + 1)
        states = torch.stack([self.states[i] for i in picks]).to(fresh.device)  # (n, S, V)
        return torch.cat((fresh, tokens)), states

    def update(self, fresh: torch.Tensor, final_states: torch.Tensor) -> None:
        """Store the fresh rows (the first fresh.shape[0]) with their final states."""
        for row in range(fresh.shape[0]):
            self.tokens.append(fresh[row].detach())
            self.states.append(final_states[row].detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not len(self):
            return {}
        return {"tokens": torch.stack(list(self.tokens)), "states": torch.stack(list(self.states))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tokens.clear()
        self.states.clear()
        if state:
            self.update(state["tokens"], state["states"])
