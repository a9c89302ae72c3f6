"""Atomic, durable file and folder writes: a reader (or a rerun) never sees a half-written
output, and an output that was renamed into place survives a power loss.

Everything is written under a temporary name in the destination's own folder (same
filesystem, so the final ``os.replace`` is atomic) and renamed into place only when complete.
The new bytes are fsynced before the rename (else the rename can reach the disk before the
data, leaving a complete-looking empty file), and the folder after it (else the rename
itself can be lost).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

# mkstemp/mkdtemp create owner-only (0600/0700) entries; outputs get the permissions an
# ordinary open()/mkdir() would give them. Read once: os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path that replaces ``destination`` when the block succeeds.

    On an exception the temporary file is removed and ``destination`` is left untouched.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=f".tmp{suffix}", dir=destination.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        fsync_tree(tmp)
        os.replace(tmp, destination)
        fsync_folder(destination.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the entries of ``folder`` (creations, renames) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync a file, or every file and folder under a folder (the folder itself last)."""
    path = Path(path)
    if path.is_dir():
        for folder, _, files in os.walk(path, topdown=False):
            for name in files:
                _fsync_file(Path(folder) / name)
            fsync_folder(folder)
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(destination: str | os.PathLike, payload: bytes) -> None:
    with atomic_path(destination) as tmp, open(tmp, "wb") as handle:
        handle.write(payload)


def atomic_write_text(destination: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(destination, text.encode())


def write_csv_atomically(frame: pd.DataFrame, destination: str | os.PathLike) -> Path:
    """``frame.to_csv(destination, index=False)``, atomically; returns ``destination``."""
    with atomic_path(destination) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(destination)


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``destination`` when the block succeeds.

    An existing ``destination`` is replaced only after the new one is complete; on an
    exception the temporary folder is removed and ``destination`` is left as it was.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    )
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        fsync_tree(tmp)
        if destination.exists():
            old = destination.with_name(f".{destination.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(destination, old)
            os.replace(tmp, destination)
            fsync_folder(destination.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, destination)
            fsync_folder(destination.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
