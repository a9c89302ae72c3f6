"""Write output files so that a reader (or Snakemake) never sees half of one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pandas as pd


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)`` then rename the result onto ``path``.

    The temporary file sits beside ``path`` (same file system, so the rename is atomic) and
    is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_csv_atomically(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    return write_atomically(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_text_atomically(text: str, path: str | os.PathLike) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
