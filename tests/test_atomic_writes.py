"""Guard: every file ebt writes goes through `ebt.outputs.atomic_path` (temporary file beside the
target, fsync, rename; a machine fault is one line). A write call in src/ebt (savefig, write_text,
write_bytes, torch.save, np.save, save_file, imwrite, imsave, `.save(...)`, open for writing)
passes when it is inside `with atomic_path(...) as temporary:` and writes to that temporary, or
when its function is in ALLOWED below, with the reason. A new in-place write fails this test."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "ebt"

WRITERS = {"savefig", "write_text", "write_bytes", "imwrite", "imsave", "save_file", "save"}
WRITERS |= {"savez", "savez_compressed", "to_csv", "to_json"}
COPIES = {"copy", "copy2", "copyfile", "copytree", "move"}  # shutil's
ATOMIC = {"atomic_path"}

ALLOWED = {  # (file under src/ebt, function): why it may write in place
    ("checkpoint/write.py", "_write_step_files"): "into the checkpoint's temporary directory, "
    "fsynced and renamed into place as a whole by save_checkpoint",
    ("training/tracking.py", "MetricsLogger.__init__"): "metrics.jsonl is append-only; a torn "
    "last line is repaired on open (repair_metrics) before anything is appended",
    ("training/tracking.py", "repair_metrics"): "the repair itself: completes or cuts the torn "
    "last line of the append-only log in place (what it cut goes aside atomically)",
    ("training/rundir.py", "RunLock.acquire"): "the lock file: held with flock, its content "
    "only says who holds it",
    ("training/bench.py", "_reset_peak_rss"): "a kernel control file (/proc), not an output",
    ("modalities/text/task.py", "TextModality.save_assets"): "Tokenizer.save, atomic itself",
    ("interop/hub.py", "save_pretrained"): "Tokenizer.save, atomic itself",
    ("interop/convert.py", "_text_run"): "Tokenizer.save, atomic itself",
    ("data/tokenizers.py", "train_bpe"): "Tokenizer.save, atomic itself",
    ("data/loader.py", "_save_cache"): "np.save into an in-memory buffer, then write_bytes",
}
OUTPUTS = "ebt.outputs"  # its write_text / write_bytes, called by their bare names, are atomic


def _mode(call: ast.Call) -> str:
    """The mode of an open() call ('r' when not given or not a literal)."""
    mode = call.args[1] if len(call.args) > 1 else None
    for keyword in call.keywords:
        mode = keyword.value if keyword.arg == "mode" else mode
    return mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else "r"


def _is_write(call: ast.Call, atomic_helpers: set[str]) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if isinstance(func, ast.Name) and name in atomic_helpers:
        return False
    if name in ("open", "fdopen"):
        return bool(set(_mode(call)) & set("wax+"))
    if isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "shutil":
        return name in COPIES
    if name == "save" and not (call.args or call.keywords):  # Trainer.save(): not a file write
        return False
    return name in WRITERS


def _temporaries(node: ast.With) -> set[str]:
    """Names bound by `with atomic_path(...) as NAME` items of a with statement."""
    names = set()
    for item in node.items:
        call, target = item.context_expr, item.optional_vars
        if isinstance(call, ast.Call) and isinstance(target, ast.Name):
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ATOMIC:
                names.add(target.id)
    return names


class _Finder(ast.NodeVisitor):
    """Write calls not aimed at an open atomic_path temporary: (line, function, source)."""

    def __init__(self, text: str, tree: ast.Module) -> None:
        self.text, self.scope, self.temporaries = text, [], []
        self.found: list[tuple[int, str, str]] = []
        self.helpers = {  # names imported from ebt.outputs
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == OUTPUTS
            for alias in node.names
        }

    def _function(self, node: ast.AST) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _function

    def visit_With(self, node: ast.With) -> None:
        self.temporaries.append(_temporaries(node))
        self.generic_visit(node)
        self.temporaries.pop()

    def visit_Call(self, node: ast.Call) -> None:
        if _is_write(node, self.helpers):
            live = set().union(*self.temporaries)
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if not live & used:
                where = ".".join(self.scope) or "<module>"
                self.found.append((node.lineno, where, ast.get_source_segment(self.text, node)))
        self.generic_visit(node)


def in_place_writes(text: str) -> list[tuple[int, str, str]]:
    tree = ast.parse(text)
    finder = _Finder(text, tree)
    finder.visit(tree)
    return finder.found


def test_the_finder_sees_an_in_place_write_and_passes_an_atomic_one():
    planted = (
        "def report(path, figure, lines):\n"
        "    path.write_text(lines)\n"
        "    figure.savefig(path, dpi=120)\n"
        "    with open(path, 'wb') as handle:\n"
        "        handle.write(b'')\n"
        "    with atomic_path(path) as temporary:\n"
        "        figure.savefig(path)\n"  # inside the block but not at the temporary
        "    write_text(path, lines)\n"  # not ebt.outputs' write_text
        "    shutil.copyfile(lines, path)\n"
    )
    assert [line for line, _, _ in in_place_writes(planted)] == [2, 3, 4, 7, 8, 9]
    atomic = (
        "from ebt.outputs import write_text\n"
        "def report(path, figure, trainer):\n"
        "    write_text(path, 'x')\n"
        "    trainer.save()\n"
        "    shutil.rmtree(path)\n"
        "    with open(path) as handle:\n"
        "        handle.read()\n"
        "    with atomic_path(path) as temporary:\n"
        "        figure.savefig(temporary, dpi=120)\n"
        "        temporary.write_text('x', encoding='utf-8')\n"
    )
    assert in_place_writes(atomic) == []


def test_every_write_in_src_goes_through_atomic_path():
    found, used = [], set()
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE).as_posix()
        for line, function, source in in_place_writes(path.read_text(encoding="utf-8")):
            if (relative, function) in ALLOWED:
                used.add((relative, function))
            else:
                found.append(f"{relative}:{line} in {function}: {source}")
    assert found == [], "write through ebt.outputs.atomic_path / write_text / write_bytes"
    assert set(ALLOWED) == used, f"stale ALLOWED entries: {set(ALLOWED) - used}"
