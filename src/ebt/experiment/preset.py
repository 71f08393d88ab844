"""Study presets (`configs/experiments/*.toml`): a scaling study written down as a file.

A preset has one table, `[study]`: `config` (the base config, a path relative to the preset),
`axis`, `values` (a list), and optionally `models`, `metric`, `out` and `overrides` (a list of
`section.key=value` applied to every point). `ebt experiment scaling PRESET` runs it; flags
given on the command line replace the preset's, and extra overrides come after its own.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ebt.config import ConfigError
from ebt.configs import find_config

FIELDS = ("config", "axis", "values", "models", "metric", "out", "overrides")


def read_preset(path: str | Path) -> dict[str, Any] | None:
    """The `[study]` table of a preset, its config path made absolute; None for a plain config."""
    found = find_config(path)
    if found is None or found.suffix != ".toml":
        return None
    path = found
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("study")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None  # load_config reports the problem with the file as a config
    if table is None:
        return None
    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown [study] keys {unknown}; known: {', '.join(FIELDS)}")
    missing = [key for key in ("config", "axis", "values") if key not in table]
    if missing:
        raise ConfigError(f"{path}: [study] needs {', '.join(missing)}")
    study = dict(table)
    study["config"] = str((path.parent / study["config"]).resolve())
    study["values"] = ",".join(str(value) for value in study["values"])
    if isinstance(study.get("models"), list):
        study["models"] = ",".join(study["models"])
    return study
