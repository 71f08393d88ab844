"""Fixed-length token examples, an on-disk cache, and deterministic (distributed) batch iterators.

An example is `seq_len + 1` token ids: the model reads `ex[:-1]` and predicts `ex[1:]`.
`DataConfig.pack` picks how documents become examples:

- pack=True: documents are joined into one stream, each followed by the pad/eos id, and the stream
  is cut into non-overlapping windows of `seq_len + 1` (the tail shorter than a window is dropped);
- pack=False (the paper's recipe): the first `seq_len + 1` tokens of each document, right-padded
  with the pad id; documents of fewer than 2 tokens (no target) are skipped.

Examples are stored as int32 (half the memory of int64); indexing and batches return torch.long.
Built datasets are cached under `$EBT_CACHE_DIR` (default `~/.cache/ebt`) in `tokens/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ebt.data.corpus import DataError, iter_documents, source_fingerprint
from ebt.data.tokenizers import Tokenizer
from ebt.errors import MachineError
from ebt.outputs import write_bytes

if TYPE_CHECKING:
    from ebt.config import DataConfig

CACHE_FORMAT = 1
ENCODE_CHUNK = 256  # documents per encode_batch call


@dataclass
class TokenDataset:
    """Examples of `seq_len + 1` token ids; `data` is int32 (N, seq_len+1), reads give long."""

    data: torch.Tensor  # (N, seq_len+1) int32
    pad_id: int
    source: str
    split: str
    num_tokens: int  # non-pad tokens of the documents used (plus separators when packed)
    from_cache: bool = False

    @property
    def seq_len(self) -> int:
        """Tokens the model reads per example (one less than stored)."""
        return int(self.data.shape[1]) - 1

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index].long()  # (seq_len+1,)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows `indices` as a long tensor (B, seq_len+1)."""
        return self.data.index_select(0, indices).long()  # (B, seq_len+1)


def cache_dir() -> Path:
    """`$EBT_CACHE_DIR` or `~/.cache/ebt`."""
    return Path(os.environ.get("EBT_CACHE_DIR") or Path.home() / ".cache" / "ebt")


def _cache_key(data: DataConfig, tokenizer: Tokenizer, source: str, split: str) -> str:
    """A hash of everything that determines the examples."""
    parts = {
        "format": CACHE_FORMAT,
        "source": source,
        "fingerprint": source_fingerprint(source),
        "split": split,
        "val_fraction": data.val_fraction,
        "text_field": data.text_field,
        "max_documents": data.max_documents,
        "tokenizer": tokenizer.name,
        "seq_len": data.seq_len,
        "pack": data.pack,
        "python": list(sys.version_info[:3]),
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def _save_cache(key: str, examples: np.ndarray, num_tokens: int) -> None:
    """Store examples as `<key>.npy` and then `<key>.json` (whose presence marks completion)."""
    import io

    folder = cache_dir() / "tokens"
    buffer = io.BytesIO()
    np.save(buffer, examples)
    try:
        write_bytes(folder / f"{key}.npy", buffer.getvalue(), durable=False)
        meta = {"num_tokens": num_tokens, "shape": list(examples.shape)}
        write_bytes(folder / f"{key}.json", json.dumps(meta).encode("utf-8"), durable=False)
    except (OSError, MachineError) as error:  # a full disk: the run goes on without the cache
        print(f"ebt: could not write the token cache in {folder}: {error}", file=sys.stderr)


def _load_cache(key: str) -> tuple[np.ndarray, int] | None:
    """(examples, num_tokens) from the cache, or None when absent or unreadable."""
    folder = cache_dir() / "tokens"
    try:
        meta = json.loads((folder / f"{key}.json").read_text())
        examples = np.load(folder / f"{key}.npy")
    except (OSError, ValueError):
        return None
    if list(examples.shape) != meta.get("shape"):
        return None
    return examples, int(meta["num_tokens"])


def _encoded(tokenizer: Tokenizer, documents: Iterable[str]) -> Iterator[np.ndarray]:
    """Int32 id arrays of `documents`, encoded `ENCODE_CHUNK` at a time."""
    chunk: list[str] = []
    for text in documents:
        chunk.append(text)
        if len(chunk) == ENCODE_CHUNK:
            yield from tokenizer.encode_batch(chunk)
            chunk = []
    if chunk:
        yield from tokenizer.encode_batch(chunk)


def pack_examples(arrays: Iterable[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, int]:
    """Join non-empty arrays, each followed by `pad_id`, and cut windows of `length`."""
    separator = np.array([pad_id], dtype=np.int32)
    pieces: list[np.ndarray] = []
    for ids in arrays:
        if ids.size:
            pieces.extend((ids.astype(np.int32, copy=False), separator))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)  # (T,)
    count = stream.size // length
    return stream[: count * length].reshape(count, length), int(stream.size)  # (N, length)


def truncate_examples(
    arrays: Iterable[np.ndarray], length: int, pad_id: int
) -> tuple[np.ndarray, int]:
    """The first `length` ids of each array of 2+ ids, right-padded with `pad_id`."""
    heads = [ids[:length] for ids in arrays if ids.size >= 2]
    examples = np.full((len(heads), length), pad_id, dtype=np.int32)  # (N, length)
    for row, ids in enumerate(heads):
        examples[row, : ids.size] = ids
    return examples, int(sum(ids.size for ids in heads))


def _build_examples(
    data: DataConfig, tokenizer: Tokenizer, source: str, split: str
) -> tuple[np.ndarray, int]:
    """Tokenize the documents of `split` and turn them into examples; too little data fails."""
    documents = iter_documents(
        source,
        split,
        val_fraction=data.val_fraction,
        text_field=data.text_field,
        max_documents=data.max_documents,
    )
    length = data.seq_len + 1
    make = pack_examples if data.pack else truncate_examples
    examples, num_tokens = make(_encoded(tokenizer, documents), length, tokenizer.pad_id)
    if len(examples) == 0:
        need = (
            f"need at least seq_len+1 = {length} for one example"
            if data.pack
            else "need a document of at least 2 tokens"
        )
        raise DataError(
            f"corpus too small: {num_tokens} tokens in source '{source}' split '{split}', {need}"
        )
    return examples, num_tokens


def build_token_dataset(
    data: DataConfig,
    tokenizer: Tokenizer,
    split: str,
    *,
    source: str | None = None,
    cache: bool = True,
) -> TokenDataset:
    """Examples of `split` of `data.source` (or `source`, e.g. `data.ood_source`), cached on disk.

    Returns a TokenDataset of shape (N, data.seq_len + 1). Raises DataError for unknown sources,
    empty splits and corpora shorter than one example.
    """
    source = (source if source is not None else data.source).strip()
    key = _cache_key(data, tokenizer, source, split) if cache else ""
    hit = _load_cache(key) if cache else None
    if hit is not None:
        examples, num_tokens = hit
    else:
        examples, num_tokens = _build_examples(data, tokenizer, source, split)
        if cache:
            _save_cache(key, examples, num_tokens)
    tensor = torch.from_numpy(np.ascontiguousarray(examples, dtype=np.int32))  # (N, seq_len+1)
    return TokenDataset(tensor, tokenizer.pad_id, source, split, num_tokens, hit is not None)


class BatchIterator:
    """Endless, deterministic batches over epochs, sharded across data-parallel ranks.

    Epoch e uses the permutation of `torch.Generator().manual_seed(seed + e)` (or the identity
    when `shuffle=False`). The permutation is trimmed to a multiple of world_size * batch_size
    (drop_last=True) or of world_size (drop_last=False: the last batch may be smaller), and rank r
    takes positions r, r + world_size, ... so ranks see disjoint examples and equal batch counts.
    `state_dict()` is {"epoch", "position"}: loading it resumes with exactly the same batches.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.position = 0, 0
        self._shard_epoch, self._shard = -1, torch.zeros(0, dtype=torch.long)
        unit = batch_size * world_size if drop_last else world_size
        self._usable = len(dataset) - len(dataset) % unit
        if self._usable == 0:
            raise DataError(
                f"{len(dataset)} examples in source '{dataset.source}' split '{dataset.split}' "
                f"make no batch of {batch_size} on {world_size} rank(s); lower the batch size, "
                "lower data.seq_len or add data"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch."""
        per_rank = self._usable // self.world_size
        return -(-per_rank // self.batch_size)

    def _indices(self) -> torch.Tensor:
        """This rank's example indices for the current epoch (computed once per epoch)."""
        if self._shard_epoch != self.epoch:
            n = len(self.dataset)
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + self.epoch)
                order = torch.randperm(n, generator=generator)  # (N,)
            else:
                order = torch.arange(n)  # (N,)
            self._shard = order[: self._usable][self.rank :: self.world_size]  # (usable/world,)
            self._shard_epoch = self.epoch
        return self._shard

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> torch.Tensor:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        indices = self._indices()[start : start + self.batch_size]  # (B,)
        self.position += 1
        return self.dataset.batch(indices)  # (B, seq_len+1)

    def state_dict(self) -> dict[str, int]:
        """The position in the stream of batches: {"epoch": int, "position": int}."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict()`; the next batch is the one that would have come next."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def iter_eval_batches(
    dataset: TokenDataset, batch_size: int, max_batches: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """Deterministic evaluation batches (B, seq_len+1), no shuffling, last partial batch kept.

    `max_batches` (0 = all) counts global batches: when it limits, max_batches * batch_size
    examples evenly spaced over the dataset are chosen, so the evaluated set is the same for any
    world size. Rank r takes every world_size-th of them; ranks may differ by one batch, so sum
    metrics locally and reduce once at the end rather than per batch.
    """
    n = len(dataset)
    wanted = max_batches * batch_size if max_batches else n
    if wanted < n:
        chosen = torch.arange(wanted) * n // wanted  # (wanted,)
    else:
        chosen = torch.arange(n)  # (N,)
    shard = chosen[rank::world_size]  # (~wanted/world,)
    for start in range(0, shard.numel(), batch_size):
        yield dataset.batch(shard[start : start + batch_size])  # (B, seq_len+1)
