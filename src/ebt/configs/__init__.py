"""The presets that ship inside the package: `text/tiny` names `configs/text/tiny.toml` here.

A config argument is a path when that file exists; otherwise it is looked up here by name, with
or without `.toml` and a leading `configs/`, so `ebt train text/tiny` and the README's
`ebt train configs/text/tiny.toml` work from any directory once ebt is installed.
"""

from __future__ import annotations

from pathlib import Path

PRESET_ROOT = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    """Every shipped preset by name (`text/tiny`, `experiments/text-data`, ...), sorted."""
    paths = PRESET_ROOT.rglob("*.toml")
    return sorted(path.relative_to(PRESET_ROOT).with_suffix("").as_posix() for path in paths)


def find_config(path: str | Path) -> Path | None:
    """`path` itself when it is a file, else the shipped preset it names; None when neither."""
    given = Path(path)
    if given.is_file():
        return given
    name = given.as_posix().removesuffix(".toml").removeprefix("configs/")
    packaged = PRESET_ROOT / f"{name}.toml"
    inside = packaged.resolve().is_relative_to(PRESET_ROOT)
    return packaged if name and inside and packaged.is_file() else None


def preset_summary(name: str, width: int = 90) -> str:
    """The first sentence of a preset's opening comment (what it trains), cut to `width`."""
    lines = (PRESET_ROOT / f"{name}.toml").read_text(encoding="utf-8").splitlines()
    comment = []
    for line in lines:
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    sentence = " ".join(comment).split(". ")[0].split(": ")[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[: width - 3].rstrip() + "..."
