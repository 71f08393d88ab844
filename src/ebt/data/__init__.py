"""Text data: tokenizers, corpus sources, fixed-length token datasets and batch iterators."""

from ebt.data.corpus import DataError, iter_documents, stdlib_files
from ebt.data.loader import BatchIterator, TokenDataset, build_token_dataset, iter_eval_batches
from ebt.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_train_command,
    train_bpe,
)

__all__ = [
    "BatchIterator",
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "TokenDataset",
    "Tokenizer",
    "build_token_dataset",
    "iter_documents",
    "iter_eval_batches",
    "load_tokenizer",
    "stdlib_files",
    "tokenizer_train_command",
    "train_bpe",
]
