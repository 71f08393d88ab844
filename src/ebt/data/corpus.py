"""Text corpora as streams of documents (strings), split into train / val by stable hashes.

Sources (`DataConfig.source`):

- ``stdlib``: the running interpreter's standard-library ``.py`` files (site-packages excluded),
  in sorted order; a file is "val" when the SHA-1 of its path relative to the stdlib root, read as
  a fraction in [0, 1), is below `val_fraction`. Same Python version -> same split everywhere.
- ``pydoc``: the documentation prose shipped with the interpreter (``pydoc_data.topics``), the
  default out-of-distribution set. It is never split: every split returns all of it.
- local paths / globs, comma-separated (a directory means every non-hidden file below it):
  split by the hash of each path relative to the files' common parent. A single file is cut into
  paragraphs (blank-line separated; lines if there is only one paragraph) and the last
  `val_fraction` of them (at least one) is val. Files that are not UTF-8 text (NUL bytes or
  invalid UTF-8) are skipped, with one line on stderr saying how many, and an error if no file
  is left.
- ``hf:NAME`` / ``hf:NAME:CONFIG``: a Hugging Face Hub dataset, streamed, `text_field` read,
  split by the hash of each example's text. ``hf-local:PATH``: the same for local data files
  (json/jsonl/csv/parquet/txt/arrow) or a directory written by ``save_to_disk``.

`max_documents` (0 = all) caps the documents of the requested split, after splitting.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ebt.data import probes  # generated reasoning probes: dyck, arithmetic
from ebt.data.splits import SPLITS, in_split
from ebt.errors import DataError

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
HF_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
}


# Local sources' text files, by the (path, size, mtime) of all their files: each is read once
# per process to find the files that are not text (and say so once).
_TEXT_FILES: dict[tuple[tuple[str, int, int], ...], list[Path]] = {}


def stdlib_root() -> Path:
    """The standard-library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files() -> list[Path]:
    """Every `.py` file of the standard library (no site-packages), sorted by relative path."""
    root = stdlib_root()
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [name for name in dirs if name not in SKIP_DIRS]
        found.extend(Path(folder) / name for name in files if name.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _read_text(path: Path, strict: bool) -> str | None:
    """The UTF-8 text of `path`; None if unreadable (or, when `strict`, not valid UTF-8)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        return data.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError:
        return None


def _hashed_files(
    files: list[Path], root: Path, split: str, val_fraction: float, strict: bool
) -> Iterator[str]:
    """Texts of the `files` whose path relative to `root` hashes into `split`."""
    for path in files:
        if in_split(path.relative_to(root).as_posix(), split, val_fraction):
            text = _read_text(path, strict)
            if text is not None:
                yield text


def _stdlib_documents(split: str, val_fraction: float) -> Iterator[str]:
    return _hashed_files(stdlib_files(), stdlib_root(), split, val_fraction, strict=True)


def _pydoc_documents(split: str, val_fraction: float) -> Iterator[str]:
    from pydoc_data.topics import topics

    return iter([topics[key] for key in sorted(topics)])


def expand_paths(spec: str) -> list[Path]:
    """Files named by comma-separated paths, globs and directories (hidden entries skipped)."""
    files: list[Path] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        expanded = os.path.expanduser(item)
        matches = (
            sorted(glob.glob(expanded, recursive=True))
            if glob.has_magic(expanded)
            else ([expanded] if os.path.exists(expanded) else [])
        )
        if not matches:
            raise DataError(f"data source path '{item}' matches nothing")
        for match in map(Path, matches):
            files.extend(_walk_files(match) if match.is_dir() else [match])
    unique = sorted({path.resolve() for path in files if path.is_file()})
    if not unique:
        raise DataError(f"data source '{spec}' names no files")
    return unique


def _walk_files(directory: Path) -> list[Path]:
    """Every non-hidden file below `directory`."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(directory):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found.extend(Path(folder) / name for name in files if not name.startswith("."))
    return found


def split_single_text(text: str, split: str, val_fraction: float) -> list[str]:
    """Paragraphs (or lines) of one file; the last `val_fraction` of them (at least 1) are val."""
    chunks = [part for part in text.split("\n\n") if part.strip()]
    if len(chunks) < 2:
        chunks = [line for line in text.splitlines() if line.strip()]
    if split == "all":
        return chunks
    if len(chunks) < 2:
        raise DataError("a single file with one line cannot be split into train and val")
    n_val = min(len(chunks) - 1, max(1, round(len(chunks) * val_fraction)))
    return chunks[-n_val:] if split == "val" else chunks[:-n_val]


def _is_text(path: Path) -> bool:
    """Whether `path` is readable UTF-8 text without NUL bytes."""
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return b"\0" not in data


def _shown(path: Path, folder: bool = False) -> str:
    """`path` as the user sees it: relative to the working directory when below it."""
    try:
        text = path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        text = path.as_posix()
    return text + "/" if folder and not text.endswith("/") else text


def _text_files(files: list[Path], root: Path) -> list[Path]:
    """The `files` that are UTF-8 text. Once per process and set of files, the others are
    counted in one line on stderr; a DataError if none is text."""
    stamps = tuple((str(path), *_stamp(path)) for path in files)
    if stamps in _TEXT_FILES:
        return _TEXT_FILES[stamps]
    verdicts = [_is_text(path) for path in files]
    text = [path for path, ok in zip(files, verdicts, strict=True) if ok]
    skipped = [path for path, ok in zip(files, verdicts, strict=True) if not ok]
    if len(files) == 1 and skipped:
        raise DataError(f"data source file {_shown(files[0])} is not UTF-8 text")
    where = f"under {_shown(root, folder=True)}"
    if not text:
        example = _shown(skipped[0])
        raise DataError(f"none of the {len(files)} files {where} is UTF-8 text (e.g. {example})")
    if skipped and os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 reports
        print(
            f"ebt: skipped {len(skipped)} of {len(files)} files {where} that are not UTF-8 text "
            f"(e.g. {_shown(skipped[0])})",
            file=sys.stderr,
        )
    _TEXT_FILES[stamps] = text
    return text


def _stamp(path: Path) -> tuple[int, int]:
    """(size, modification time) of `path`, (-1, -1) if it cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def _local_documents(spec: str, split: str, val_fraction: float) -> Iterator[str]:
    files = expand_paths(spec)
    root = Path(os.path.commonpath([str(path.parent) for path in files]))  # of all the files
    files = _text_files(files, root)
    if len(files) == 1:
        text = _read_text(files[0], strict=True) or ""
        return iter(split_single_text(text, split, val_fraction))
    return _hashed_files(files, root, split, val_fraction, strict=True)


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face sources need `pip install datasets` (or ebt[hf])") from None
    return datasets


@contextlib.contextmanager
def hf_errors(source: str) -> Iterator[None]:
    """Turn a failure to open or read a Hugging Face dataset (no network, no such dataset, a
    bad config name) into a one-line DataError naming the source."""
    try:
        yield
    except DataError:
        raise
    except (OSError, ValueError, RuntimeError) as error:
        why = " ".join(str(error).split())[:200] or type(error).__name__
        hint = "; without the network, save it where you have one and pass hf-local:PATH"
        raise DataError(f"cannot load {source}: {type(error).__name__}: {why}{hint}") from None


def open_hf_dataset(source: str, streaming: bool, folder_as_images: bool = False) -> Any:
    """The train split of `hf:NAME[:CONFIG]` or `hf-local:PATH` (a `save_to_disk` directory,
    data files, or with folder_as_images a folder read as `imagefolder`); failures are
    one-line DataErrors (hf_errors)."""
    with hf_errors(source):
        return _load_hf(source, streaming, folder_as_images)


def _load_hf(source: str, streaming: bool, folder_as_images: bool) -> Any:
    datasets = _import_datasets()
    if source.startswith("hf:"):
        name, _, config = source[len("hf:") :].partition(":")
        return datasets.load_dataset(name, config or None, split="train", streaming=streaming)
    path = source[len("hf-local:") :]
    target = Path(path).expanduser()
    if target.is_dir() and any((target / n).is_file() for n in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(target))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
        return loaded
    if target.is_dir() and folder_as_images:
        return datasets.load_dataset("imagefolder", data_dir=str(target), split="train")
    files = [str(file) for file in expand_paths(path)]
    builder = HF_BUILDERS.get(Path(files[0]).suffix.lower())
    if builder is None:
        raise DataError(f"hf-local: unknown file type '{files[0]}' (use {sorted(HF_BUILDERS)})")
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming)


def _hf_rows(source: str, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The rows of a (streamed) dataset, read failures as one-line DataErrors."""
    with hf_errors(source):
        yield from rows


def _hf_documents(
    rows: Iterable[dict[str, Any]], text_field: str, split: str, val_fraction: float
) -> Iterator[str]:
    """`text_field` of each row in `split` (hash of the text); a missing field fails loudly."""
    for row in rows:
        if text_field not in row:
            fields = ", ".join(sorted(row))
            raise DataError(f"text field '{text_field}' not in the dataset; fields: {fields}")
        text = row[text_field]
        if isinstance(text, str) and in_split(text, split, val_fraction):
            yield text


def _resolve(source: str, text_field: str) -> Callable[[str, float], Iterator[str]]:
    """A function (split, val_fraction) -> documents for `source`; unknown sources fail here."""
    if source == "stdlib":
        return _stdlib_documents
    if source == "pydoc":
        return _pydoc_documents
    if probes.is_probe_source(source):
        return probes.documents_function(source)
    if source.startswith(("hf-local:", "hf:")):
        rows = open_hf_dataset(source, streaming=True)
        return lambda split, frac: _hf_documents(_hf_rows(source, rows), text_field, split, frac)
    looks_like_path = any(char in source for char in "/\\,.*?[~") or os.path.exists(source)
    if not looks_like_path or "://" in source:
        raise DataError(
            f"unknown data source '{source}': use stdlib, pydoc, dyck[:...], arithmetic[:...], "
            "a path/glob[,path...], hf:NAME[:CONFIG] or hf-local:PATH"
        )
    expand_paths(source)  # fail now if nothing matches
    return lambda split, frac: _local_documents(source, split, frac)


def _checked(
    documents: Iterator[str], source: str, split: str, val_fraction: float, max_documents: int
) -> Iterator[str]:
    """Pass documents through, stop at `max_documents`, fail if the split is empty."""
    count = 0
    for text in documents:
        if max_documents and count >= max_documents:
            return
        count += 1
        yield text
    if count == 0:
        hint = "raise val_fraction or add files" if split == "val" else "lower val_fraction"
        name = "validation" if split == "val" else split
        raise DataError(
            f"no {name} documents: source '{source}' at val_fraction={val_fraction}; {hint}"
        )


def iter_documents(
    source: str,
    split: str,
    *,
    val_fraction: float = 0.05,
    text_field: str = "text",
    max_documents: int = 0,
) -> Iterator[str]:
    """Documents (strings) of `split` ("train", "val" or "all") of `source`, in a stable order.

    Unknown sources and paths that match nothing fail at call time; an empty split fails when
    the returned iterator is exhausted without yielding anything.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    documents = _resolve(source.strip(), text_field)(split, val_fraction)
    return _checked(documents, source, split, val_fraction, max_documents)


def source_fingerprint(source: str) -> str:
    """A string that changes when the files behind a local source change (for cache keys)."""
    source = source.strip()
    if source in ("stdlib", "pydoc"):
        return f"{source}|{sys.version}|{stdlib_root()}"
    if probes.is_probe_source(source):
        return probes.fingerprint(source)
    path = source.split(":", 1)[1] if source.startswith("hf-local:") else source
    if source.startswith("hf:"):
        return source
    try:
        files = expand_paths(path)
    except DataError:
        return source
    stats = [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha1("\n".join([source, *stats]).encode("utf-8")).hexdigest()
