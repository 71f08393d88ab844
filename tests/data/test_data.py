"""Tests of the text data pipeline: tokenizers, corpus sources, token datasets and iterators."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ebt.config import DataConfig
from ebt.data import (
    BatchIterator,
    ByteTokenizer,
    DataError,
    HFTokenizer,
    TokenDataset,
    build_token_dataset,
    iter_documents,
    iter_eval_batches,
    load_tokenizer,
    stdlib_files,
    tokenizer_train_command,
    train_bpe,
)
from ebt.data.corpus import in_split, stdlib_root

PARAGRAPHS = [
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i * i}." for i in range(40)
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i in range(30):
        target = folder / ("sub" if i % 3 == 0 else ".") / f"doc{i:02d}.txt"
        target.write_text(f"document {i}\n" + "some words here. " * (i + 1))
    (folder / ".hidden.txt").write_text("never read")
    return folder


def _data(source: str, **overrides: object) -> DataConfig:
    return DataConfig(source=source, **overrides)  # type: ignore[arg-type]


# --- tokenizers ---------------------------------------------------------------------------------


def test_byte_round_trip_non_ascii() -> None:
    tok = ByteTokenizer()
    text = "héllo wörld — ∑ 日本語 🙂\n\ttab"
    ids = tok.encode(text)
    assert isinstance(ids, list) and ids == (np.frombuffer(text.encode(), np.uint8) + 1).tolist()
    assert min(ids) >= 1 and max(ids) <= 256 and tok.vocab_size == 257 and tok.pad_id == 0
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor([0, *ids, 0, 0])) == text  # pads skipped, tensors accepted
    assert tok.encode_batch(["ab", ""])[0].dtype == np.int32
    assert tok.decode([0xC3 + 1]) == "\ufffd"  # a cut multi-byte character is replaced


def test_bpe_train_save_load(tmp_path: Path) -> None:
    tok = train_bpe(PARAGRAPHS * 5, 300, tmp_path / "bpe")
    assert (tmp_path / "bpe" / "tokenizer.json").is_file()
    assert tok.pad_id == 0 and tok.vocab_size == 300
    text = "the quick brown fox ünïcode"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())
    for spec in (tmp_path / "bpe", tmp_path / "bpe" / "tokenizer.json"):
        again = load_tokenizer(str(spec))
        assert isinstance(again, HFTokenizer) and again.encode(text) == ids
        assert again.name == tok.name
    assert tok.decode([0, *ids, 0]) == text
    saved = tok.save(tmp_path / "copy")
    assert load_tokenizer(str(saved)).encode(text) == ids


def test_load_tokenizer_specs(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    ByteTokenizer().save(tmp_path / "byte")
    assert isinstance(load_tokenizer(str(tmp_path / "byte")), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="unknown tokenizer"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_tokenizer_train_command(
    text_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tokenizer_train_command(str(text_dir), 280, str(tmp_path / "tok"), max_documents=10)
    assert path == tmp_path / "tok" / "tokenizer.json" and path.is_file()
    assert "10 documents" in capsys.readouterr().out
    assert load_tokenizer(str(path)).vocab_size <= 280


# --- corpus sources -----------------------------------------------------------------------------


def test_stdlib_split_deterministic_disjoint() -> None:
    root = stdlib_root()
    files = stdlib_files()
    assert files == stdlib_files() and len(files) > 100
    assert not any("site-packages" in path.parts for path in files)
    keys = [path.relative_to(root).as_posix() for path in files]
    train = {key for key in keys if in_split(key, "train", 0.05)}
    val = {key for key in keys if in_split(key, "val", 0.05)}
    assert train and val and not train & val and train | val == set(keys)
    docs = list(iter_documents("stdlib", "val", max_documents=5))
    assert docs == list(iter_documents("stdlib", "val", max_documents=5)) and len(docs) == 5
    first_val = next(
        path for path in files if in_split(path.relative_to(root).as_posix(), "val", 0.05)
    )
    assert docs[0] == first_val.read_text(encoding="utf-8")


def test_pydoc_is_unsplit_and_non_empty() -> None:
    val = list(iter_documents("pydoc", "val"))
    assert len(val) > 10 and sum(map(len, val)) > 100_000
    assert val == list(iter_documents("pydoc", "train"))


def test_local_directory_glob_and_list(text_dir: Path) -> None:
    every = list(iter_documents(str(text_dir), "all"))
    assert len(every) == 30 and "never read" not in every
    train = list(iter_documents(str(text_dir), "train", val_fraction=0.3))
    val = list(iter_documents(str(text_dir), "val", val_fraction=0.3))
    assert train and val and sorted(train + val) == sorted(every)
    globbed = list(iter_documents(str(text_dir / "**" / "doc1*.txt"), "all"))
    assert len(globbed) == 10
    listed = f"{text_dir / 'doc01.txt'},{text_dir / 'sub'}"
    assert len(list(iter_documents(listed, "all"))) == 11


def test_single_file_split_by_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("\n\n".join(PARAGRAPHS))
    train = list(iter_documents(str(path), "train", val_fraction=0.1))
    val = list(iter_documents(str(path), "val", val_fraction=0.1))
    assert train == PARAGRAPHS[:36] and val == PARAGRAPHS[36:]
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("line one\nline two\n")
    assert list(iter_documents(str(tiny), "val", val_fraction=0.01)) == ["line two"]


def test_hf_local_json_and_saved(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"text": text, "id": i} for i, text in enumerate(PARAGRAPHS)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train = list(iter_documents(f"hf-local:{jsonl}", "train", val_fraction=0.2))
    val = list(iter_documents(f"hf-local:{jsonl}", "val", val_fraction=0.2))
    assert train and val and sorted(train + val) == sorted(PARAGRAPHS)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    assert list(iter_documents(f"hf-local:{saved}", "val", val_fraction=0.2)) == val
    with pytest.raises(DataError, match="fields: id, text"):
        list(iter_documents(f"hf-local:{jsonl}", "all", text_field="body"))


def test_hf_hub_streams_train_split(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(*args: object, **kwargs: object) -> list[dict[str, str]]:
        calls.append((args, kwargs))
        return [{"content": text} for text in PARAGRAPHS]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = list(iter_documents("hf:org/name:cfg", "all", text_field="content", max_documents=3))
    assert docs == PARAGRAPHS[:3]
    assert calls == [(("org/name", "cfg"), {"split": "train", "streaming": True})]


def test_source_errors(tmp_path: Path, text_dir: Path) -> None:
    with pytest.raises(DataError, match="unknown data source 'stdlb'"):
        iter_documents("stdlb", "train")
    with pytest.raises(DataError, match="matches nothing"):
        iter_documents(str(tmp_path / "nothing" / "*.txt"), "train")
    with pytest.raises(DataError, match="no validation documents.*raise val_fraction"):
        list(iter_documents(str(text_dir), "val", val_fraction=0.0))
    with pytest.raises(DataError, match="unknown split"):
        iter_documents("stdlib", "test")


# --- token datasets -----------------------------------------------------------------------------


def test_pack_shapes_and_stream(tmp_path: Path) -> None:
    docs = ["abc", "", "defgh", "ij"]
    for i, text in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(text)
    data = _data(str(tmp_path / "*.txt"), seq_len=3)
    dataset = build_token_dataset(data, ByteTokenizer(), "all")
    stream = [ord(c) + 1 if c != "|" else 0 for c in "abc|defgh|ij|"]
    assert dataset.data.shape == (3, 4) and dataset.num_tokens == len(stream)
    assert dataset.data.flatten().tolist() == stream[:12]
    assert dataset[0].dtype == torch.long and dataset.seq_len == 3


def test_no_pack_truncates_and_pads(tmp_path: Path) -> None:
    for i, text in enumerate(["abcdefgh", "xy", "z", "hello"]):
        (tmp_path / f"{i}.txt").write_text(text)
    data = _data(str(tmp_path), seq_len=4, pack=False)
    dataset = build_token_dataset(data, ByteTokenizer(), "all")
    tok = ByteTokenizer()
    assert dataset.data.shape == (3, 5)  # "z" has no target and is skipped
    assert dataset[0].tolist() == tok.encode("abcde")
    assert dataset[1].tolist() == tok.encode("xy") + [0, 0, 0]
    assert dataset[2].tolist() == tok.encode("hello")


def test_dataset_errors(text_dir: Path) -> None:
    with pytest.raises(DataError, match=r"corpus too small: \d+ tokens .* seq_len\+1 = 100001"):
        build_token_dataset(_data(str(text_dir), seq_len=100_000), ByteTokenizer(), "val")
    with pytest.raises(DataError, match="no validation documents"):
        build_token_dataset(_data(str(text_dir), val_fraction=0.0), ByteTokenizer(), "val")
    with pytest.raises(DataError, match="unknown data source"):
        build_token_dataset(_data("nonsense"), ByteTokenizer(), "train")


def test_stdlib_dataset_and_cache() -> None:
    data = _data("stdlib", seq_len=32, max_documents=40)
    first = build_token_dataset(data, ByteTokenizer(), "train")
    again = build_token_dataset(data, ByteTokenizer(), "train")
    assert not first.from_cache and again.from_cache
    assert first.data.dtype == torch.int32 and torch.equal(first.data, again.data)
    ood = build_token_dataset(data, ByteTokenizer(), "val", source="pydoc")
    assert ood.source == "pydoc" and len(ood) > 100


# --- iterators ----------------------------------------------------------------------------------


def _toy_dataset(n: int, length: int = 5) -> TokenDataset:
    rows = torch.arange(n, dtype=torch.int32)[:, None].repeat(1, length)  # (n, length)
    return TokenDataset(rows, 0, "toy", "train", n * length)


def test_batch_iterator_deterministic() -> None:
    dataset = _toy_dataset(23)
    a = BatchIterator(dataset, 4, seed=7)
    b = BatchIterator(dataset, 4, seed=7)
    batches = [next(a) for _ in range(12)]
    assert all(torch.equal(x, next(b)) for x in batches)
    assert batches[0].shape == (4, 5) and batches[0].dtype == torch.long
    assert a.batches_per_epoch == 5 and a.state_dict() == {"epoch": 2, "position": 2}
    epoch0 = torch.cat([x[:, 0] for x in batches[:5]])
    assert epoch0.unique().numel() == 20  # one epoch: no repeats
    other = BatchIterator(dataset, 4, seed=8)
    assert not torch.equal(torch.cat([next(other) for _ in range(5)])[:, 0], epoch0)


def test_batch_iterator_rank_shards() -> None:
    dataset = _toy_dataset(50)
    world, batch = 3, 4
    seen = []
    for rank in range(world):
        iterator = BatchIterator(dataset, batch, seed=1, rank=rank, world_size=world)
        seen.append(torch.cat([next(iterator)[:, 0] for _ in range(iterator.batches_per_epoch)]))
    ids = torch.cat(seen)
    assert ids.numel() == 48 and ids.unique().numel() == 48  # disjoint, 50 trimmed to 48
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    assert sorted(ids.tolist()) == sorted(perm[:48].tolist())


def test_batch_iterator_resume() -> None:
    dataset = _toy_dataset(19)
    run = BatchIterator(dataset, 3, seed=5, rank=1, world_size=2)
    for _ in range(7):
        next(run)
    state = run.state_dict()
    assert all(isinstance(value, int) for value in state.values())
    expected = [next(run) for _ in range(6)]
    resumed = BatchIterator(dataset, 3, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, next(resumed)) for x in expected)
    with pytest.raises(DataError, match="make no batch"):
        BatchIterator(_toy_dataset(5), 3, seed=0, world_size=2)


def test_eval_batches() -> None:
    dataset = _toy_dataset(10)
    batches = list(iter_eval_batches(dataset, 4, 0))
    assert [len(x) for x in batches] == [4, 4, 2]
    assert torch.cat(batches)[:, 0].tolist() == list(range(10))
    shards = [torch.cat(list(iter_eval_batches(dataset, 2, 0, r, 3)))[:, 0] for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    limited = torch.cat(list(iter_eval_batches(dataset, 2, 2)))[:, 0]
    assert limited.tolist() == [0, 2, 5, 7]
