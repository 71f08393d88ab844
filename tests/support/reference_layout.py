"""Checkpoints in the paper's layout, made up for tests: random weights under the paper's
parameter names, its hyper-parameter names, and a small word-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers

WORDS = [f"w{i}" for i in range(1, 64)]


def write_word_tokenizer(path: Path) -> Path:
    """A 64-entry word-level tokenizer.json ("<|endoftext|>" = 0, then w1..w63)."""
    vocab = {"<|endoftext|>": 0} | {word: index for index, word in enumerate(WORDS, start=1)}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(path))
    return path


def paper_state_dict(
    variant: str, vocab: int = 257, dim: int = 16, layers: int = 2, ffn: int = 24, steps: int = 3
) -> dict[str, torch.Tensor]:
    """Random weights in the paper's key layout (`model.` prefix); variant "tpp": Transformer++."""
    generator = torch.Generator().manual_seed(len(variant))

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * 0.1

    state = {"model.embeddings.weight": tensor(vocab, dim)}
    if variant != "tpp":
        state |= {"model.alpha": torch.tensor(37.0), "model.langevin_dynamics_noise_std": tensor()}
        state["model.vocab_to_embed.weight"] = tensor(dim, vocab)
    for layer in range(layers):
        prefix = f"model.transformer.layers.{layer}."
        state |= {f"{prefix}attention.w{name}.weight": tensor(dim, dim) for name in "qkvo"}
        state[f"{prefix}feed_forward.w1.weight"] = tensor(ffn, dim)
        state[f"{prefix}feed_forward.w2.weight"] = tensor(dim, ffn)
        state[f"{prefix}feed_forward.w3.weight"] = tensor(ffn, dim)
        state[f"{prefix}attention_norm.weight"] = tensor(dim)
        state[f"{prefix}ffn_norm.weight"] = tensor(dim)
        if variant == "adaln":
            state[f"{prefix}adaLN_modulation.1.weight"] = tensor(6 * dim, dim)
            state[f"{prefix}adaLN_modulation.1.bias"] = tensor(6 * dim)
    state["model.transformer.norm.weight"] = tensor(dim)
    if variant == "tpp":
        return state | {"model.output.weight": tensor(vocab, dim)}
    if variant != "default":
        state["model.transformer.time_embeddings.weight"] = tensor(steps, dim)
    if variant != "adaln":
        return state | {"model.transformer.final_layer.weight": tensor(1, dim)}
    final = "model.transformer.final_layer."
    state[f"{final}linear.weight"] = tensor(1, dim)
    state[f"{final}adaLN_modulation.1.weight"] = tensor(2 * dim, dim)
    return state | {f"{final}adaLN_modulation.1.bias": tensor(2 * dim)}


def paper_hparams(variant: str, dim: int = 16, ffn: int = 24, steps: int = 3, **changes) -> dict:
    values = {
        "modality": "NLP",
        "model_name": "baseline_transformer" if variant == "tpp" else "ebt",
        "tokenizer": "some/tokenizer",
        "embedding_dim": dim,
        "num_transformer_blocks": 2,
        "multiheaded_attention_heads": 2,
        "ffn_dim_multiplier": ffn / dim,
        "context_length": 12,
        "ebt_type": "time_embed" if variant == "tpp" else variant,
        "mcmc_num_steps": steps,
        "mcmc_step_size": 500.0,
        "mcmc_step_size_learnable": True,
        "normalize_initial_condition": variant != "tpp",
        "dataset_name": "pajama",
        "wandb_tags": ["a", "b"],
    }
    return values | changes


def write_paper_checkpoint(path: Path, variant: str, **changes) -> Path:
    checkpoint = {
        "state_dict": paper_state_dict(variant),
        "hyper_parameters": paper_hparams(variant, **changes),
        "global_step": 1234,
        "epoch": 3,
    }
    torch.save(checkpoint, path)
    return path
