"""Text: next-token prediction. A batch is (B, S + 1) token ids; the context is batch[:, :-1],
the targets batch[:, 1:]; a candidate is a logit vector per position (B, S, V)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ebt.config import Config, ThinkConfig
from ebt.data import (
    BatchIterator,
    TokenDataset,
    Tokenizer,
    build_token_dataset,
    load_tokenizer,
)
from ebt.modalities.unit import ModalityUnit
from ebt.nn.layers import at_least_float32
from ebt.thinking.metrics import perplexity


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, S, V) over targets (B, S), pads ignored."""
    logits = at_least_float32(logits.flatten(0, 1))  # (B * S, V)
    return F.cross_entropy(logits, targets.flatten(), ignore_index=pad_id)


def initial_state(
    think_config: ThinkConfig, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """The starting candidate (B, S, V): Gaussian noise (scaled) or zeros."""
    if think_config.init == "zeros":
        return torch.zeros(shape, device=device)
    return torch.randn(shape, device=device) * think_config.init_scale


@dataclass
class TextTask:
    """What the shared objective needs to know about next-token prediction."""

    vocab_size: int
    pad_id: int = 0
    weight_name = "tokens"  # what evaluation means are weighted by
    baseline_forward_passes = 1  # Transformer++: one forward per token
    quality_keys = ()  # extra per-batch evaluation metrics (see quality)

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, S), targets (B, S)) of token ids (B, S + 1)."""
        return batch[:, :-1], batch[:, 1:]

    def initial_state(self, think_config: ThinkConfig, context, targets) -> torch.Tensor:
        shape = (*targets.shape, self.vocab_size)
        return initial_state(think_config, shape, targets.device)  # (B, S, V)

    def step_size_shape(self, targets: torch.Tensor) -> tuple[int, ...]:
        """A per-token step size broadcasts over the vocabulary: (B, S, 1)."""
        return (*targets.shape, 1)

    def loss(self, state: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(state, targets, self.pad_id)

    def baseline_training_loss(self, model: nn.Module, context, targets) -> torch.Tensor:
        return cross_entropy(model(context), targets, self.pad_id)

    def baseline_prediction(self, model: nn.Module, context, targets) -> torch.Tensor:
        return model(context)  # (B, S, V) logits

    def weight(self, batch: torch.Tensor) -> torch.Tensor:
        """How much a batch counts in an evaluation mean: its non-pad targets."""
        return (batch[:, 1:] != self.pad_id).sum().double()

    def quality(self, state: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch means of extra evaluation metrics (none for text)."""
        return {}

    def summarise(self, result: dict[str, Any]) -> dict[str, Any]:
        return result | {"ppl": perplexity(result["loss"])}


class TextModality(ModalityUnit):
    """Tokenizer, token datasets and the text task of a config."""

    name = "text"
    commands = "ebt generate, ebt think or ebt probe"
    default_metric = "ppl"
    metrics = ("loss", "ppl", "forward_passes")
    generates_tokens = True

    @classmethod
    def units_per_example(cls, config: Config) -> int:
        """Tokens per example: the predicted positions, data.seq_len."""
        return config.data.seq_len

    @classmethod
    def example_batch(cls, config: Config, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Random token ids 1..V-1 (B, S + 1)."""
        shape = (config.train.batch_size, config.data.seq_len + 1)
        return torch.randint(1, vocab_size, shape, device=device)  # (B, S + 1)

    @classmethod
    def run_tokenizer(cls, step_dir: Path, config: Config) -> Tokenizer:
        """The run's saved tokenizer (beside the step directories or inside one), else the one
        data.tokenizer names."""
        for candidate in (step_dir.parent / "tokenizer", step_dir / "tokenizer"):
            if candidate.is_dir():
                return load_tokenizer(str(candidate))
        return load_tokenizer(config.data.tokenizer)

    def __init__(self, config: Config, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer or load_tokenizer(config.data.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def dataset(self, split: str, source: str | None = None) -> TokenDataset:
        """Examples of a split ("train", "val", "ood" or "all" of `source`)."""
        data = self.config.data
        if split == "ood":
            return build_token_dataset(data, self.tokenizer, "all", source=data.ood_source)
        return build_token_dataset(data, self.tokenizer, split, source=source)

    def batches(self, dataset: TokenDataset, **kwargs: Any) -> BatchIterator:
        return BatchIterator(dataset, self.config.train.batch_size, **kwargs)

    def task(self, split: str = "val") -> TextTask:
        return TextTask(self.vocab_size, self.tokenizer.pad_id)

    def save_assets(self, run_dir: Path) -> None:
        self.tokenizer.save(run_dir / "tokenizer")
