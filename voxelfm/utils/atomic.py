"""Atomic file and folder writes: a reader (or a rerun) never sees a half-written output.

Everything is written under a temporary name in the destination's own folder (same
filesystem, so the final ``os.replace`` is atomic) and renamed into place only when complete.
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
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(destination: str | os.PathLike, payload: bytes) -> None:
    with atomic_path(destination) as tmp, open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


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
        if destination.exists():
            old = destination.with_name(f".{destination.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(destination, old)
            os.replace(tmp, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, destination)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
