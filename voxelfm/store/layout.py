"""Where things live inside a shard store, and which scan groups count as complete.

A shard store is a Zarr v3 directory store ``<root>/shard_XXX.zarr`` holding one group per
scan, ``<scan_id>/image`` plus optional ``<scan_id>/labels/<name>``. A scan group is written
under a hidden temporary name and renamed to ``<scan_id>`` only when every byte is on disk,
so the rename is the completion marker: any directory whose name is a valid scan id is a
complete scan, and nothing else is ever listed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

IMAGE_ARRAY = "image"
LABELS_GROUP = "labels"

# Temporary names start with "." so they can never be valid scan ids (which start with a
# letter or digit) and are invisible to `list_complete_scans`.
PARTIAL_PREFIX = ".partial-"

# Portable file names that are also legal Zarr node names (no "/", no leading "." or "__").
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RESERVED_NAMES = {"zarr.json"}

SAFE_NAME_RULE = (
    "must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
)


def is_safe_name(name: str) -> bool:
    """True when ``name`` can be used as a scan id or label name inside a Zarr path."""
    return bool(_SAFE_NAME.fullmatch(name)) and name not in _RESERVED_NAMES


def shard_store_name(index: int) -> str:
    """File name of shard ``index``'s store, e.g. ``shard_003.zarr``."""
    return f"shard_{index:03d}.zarr"


def is_store(path: str | os.PathLike) -> bool:
    """True when ``path`` is a Zarr v3 directory store (has a root ``zarr.json``)."""
    return (Path(path) / "zarr.json").is_file()


def list_complete_scans(store_path: str | os.PathLike) -> list[str]:
    """Sorted ids of the complete scan groups in one shard store."""
    store_path = Path(store_path)
    if not store_path.is_dir():
        return []
    return sorted(
        entry.name
        for entry in os.scandir(store_path)
        if entry.is_dir() and is_safe_name(entry.name)
    )


def list_partial_scans(store_path: str | os.PathLike) -> list[Path]:
    """Leftovers of interrupted scan writes in one shard store."""
    store_path = Path(store_path)
    if not store_path.is_dir():
        return []
    return sorted(p for p in store_path.iterdir() if p.name.startswith(PARTIAL_PREFIX))
