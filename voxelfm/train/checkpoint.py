"""Atomic, resumable training checkpoints.

A checkpoint holds everything needed to continue a run exactly: model (student, teacher,
loss centres), optimiser, the iteration (schedules and data order are pure functions of it)
and the RNG states (stochastic depth). Files are ``ckpt_<iteration>.pt`` in one folder,
written atomically, so the newest complete file is always a valid resume point.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from voxelfm.errors import InputError
from voxelfm.utils.atomic import atomic_write_bytes

_CHECKPOINT_RE = re.compile(r"^ckpt_(\d{9})\.pt$")


def checkpoint_path(folder: Path, iteration: int) -> Path:
    return Path(folder) / f"ckpt_{iteration:09d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, iteration: int, state: dict[str, Any], max_to_keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``iteration`` and prune older ones."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = checkpoint_path(folder, iteration)
    atomic_write_bytes(path, buffer.getvalue())
    for _, old in list_checkpoints(folder)[:-max_to_keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain containers only)."""
    from voxelfm.models.weights import load_torch_file

    if not Path(path).is_file():
        raise InputError(path, "checkpoint file does not exist")
    state = load_torch_file(path)
    if not isinstance(state, dict) or "model" not in state:
        raise InputError(path, "not a VoxelFM training checkpoint (no model state)")
    return state
