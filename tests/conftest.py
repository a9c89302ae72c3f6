"""Shared test fixtures: where the real CT folder is, and small synthetic volumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_root() -> Path | None:
    """The real CT folder: $VOXELFM_REAL_DATA, else ../shared/data beside the repository."""
    env = os.environ.get("VOXELFM_REAL_DATA")
    candidate = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def real_data() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip(
            "real CT data not found: set VOXELFM_REAL_DATA to the shared data folder "
            "(../shared/data beside the repository by default)"
        )
    return root
