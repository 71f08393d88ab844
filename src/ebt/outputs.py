"""Files a command writes where the user said: checked before any compute, written atomically.

    outputs = [Output("--output", args.output, IMAGE), Output("--grid", args.grid, PNG)]
    check_outputs(outputs, inputs=[args.input])   # OutputError (one line) before loading
    with atomic_path(args.output) as temporary:   # write `temporary`; renamed over the target
        write_image(temporary)

`check_outputs` refuses, naming the flag: a path that is (or names, with a trailing `/`) a
directory, a suffix the format does not fit, a symbolic link (it would write to its target), a
path that is one of the command's inputs or another of its outputs (also through another
spelling, a link or a hard link), and a parent directory that cannot be made or written.
`atomic_path` writes into a temporary file beside the target, fsyncs it and renames it over the
target (`os.replace`), so a failed write leaves neither a half-written file nor a temporary one,
and a machine fault there (no space, read-only, permission) is one line (MachineError) naming the
file, the cause and that the previous file is unchanged. Every file ebt writes goes through it
(`write_text` / `write_bytes` for the simple cases); tests/test_atomic_writes.py keeps it so.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ebt.errors import MachineError, OutputError, machine_cause

PNG = (".png",)
GIF = (".gif",)
IMAGE = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MARKDOWN = (".md",)
JSONL = (".jsonl",)
DIRECTORY: tuple[str, ...] = ()  # the output is a directory (made if missing)


@dataclass(frozen=True)
class Output:
    """One file (or directory) a command writes: its flag, the path as typed ("" = not asked)
    and the suffixes its format takes (DIRECTORY: a directory)."""

    flag: str
    path: str
    suffixes: tuple[str, ...]


def _same(first: Path, second: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or the same inode."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _check_parent(output: Output, path: Path) -> None:
    """The nearest existing ancestor must be a directory this process can write into."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        if ancestor.is_symlink():  # a dangling link: mkdir would fail
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{output.flag} {output.path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{output.flag} {output.path}: cannot write into {ancestor}")


def _check_format(output: Output, path: Path) -> None:
    if path.is_symlink():  # files and directories alike: writing would reach the target
        raise OutputError(
            f"{output.flag} {output.path}: a symbolic link (to {os.path.realpath(path)}); "
            "name the file itself"
        )
    if not output.suffixes:  # a directory
        if path.exists() and not path.is_dir():
            raise OutputError(f"{output.flag} {output.path}: a file, not a directory")
        return
    if output.path.endswith(("/", os.sep)) or path.is_dir():
        raise OutputError(
            f"{output.flag} {output.path}: a directory; name a {'/'.join(output.suffixes)} file"
        )
    if path.suffix.lower() not in output.suffixes:
        raise OutputError(f"{output.flag} {output.path}: name a {'/'.join(output.suffixes)} file")


def check_outputs(outputs: Iterable[Output], inputs: Iterable[str | Path] = ()) -> list[Output]:
    """The outputs asked for (path given), each checked (see the module docstring); OutputError,
    one line naming the flag, for the first that fails. Creates nothing."""
    asked = [output for output in outputs if output.path]
    given = [Path(path) for path in inputs if path]
    for index, output in enumerate(asked):
        path = Path(output.path)
        _check_format(output, path)
        for source in given:
            if _same(path, source):
                raise OutputError(f"{output.flag} {output.path}: that is an input ({source})")
        for other in asked[:index]:
            if _same(path, Path(other.path)):
                raise OutputError(f"{output.flag} {output.path}: also written by {other.flag}")
        _check_parent(output, path)
    return asked


def fsync_path(path: Path) -> None:
    """Flush a file's (or, where the OS allows it, a directory's) contents to disk. A file's
    failure counts (ENOSPC shows up here on some filesystems); a directory may refuse."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError as error:
        if not path.is_dir() or error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def machine_error(path: Path, error: OSError, existed: bool) -> MachineError | None:
    """The one line for a failed write of `path` (None when `error` is not the machine's)."""
    cause = machine_cause(error)
    if cause is None:
        return None
    kept = f"the previous {path.name} is unchanged" if existed else f"no {path.name} was written"
    return MachineError(f"cannot write {path}: {cause}; {kept}")


_live: set[Path] = set()  # temporaries of the atomic_path blocks now open


@contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, so writers pick the same format) to write;
    when the block ends it is fsynced and renamed over `path` (then the folder is fsynced); it
    is deleted if the block raises. Parent folders are made. A machine fault (no space,
    read-only, permission) becomes MachineError naming `path`. Nested on a temporary of an
    open block (a writer that is atomic itself, called by one that wraps it), it is that path.
    durable=False skips the fsyncs (about 8 ms a file on ext4) for caches, whose readers
    rebuild an entry they cannot read."""
    path = Path(path)
    if path in _live:
        yield path
        return
    existed = path.exists()
    temporary = path.with_name(f".{path.stem}-{secrets.token_hex(4)}.partial{path.suffix}")
    _live.add(temporary)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        if durable:
            fsync_path(temporary)
        os.replace(temporary, path)
        if durable:
            fsync_path(path.parent)
    except OSError as error:
        failure = machine_error(path, error, existed)
        if failure is None:
            raise
        raise failure from error
    finally:
        _live.discard(temporary)
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see atomic_path)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    """Write `data` to `path` atomically (see atomic_path)."""
    with atomic_path(path, durable) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def written_lines(files: dict[str, str]) -> str:
    """`wrote NAME: PATH` lines for a human-readable summary (empty when nothing was written)."""
    return "\n".join(f"wrote {name}: {path}" for name, path in files.items() if path)
