"""Which split an item belongs to: a stable hash of its key against `val_fraction` (the same on
every machine and Python run, so train and validation never share an item)."""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "all")


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from the SHA-1 of `key` (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def in_split(key: str, split: str, val_fraction: float) -> bool:
    """Whether the item with stable `key` belongs to `split` ("train", "val" or "all")."""
    if split == "all":
        return True
    return (hash_fraction(key) < val_fraction) == (split == "val")
