"""Backbone weight I/O: published VoxelFM checkpoints in, our safetensors checkpoints out/in.

Published / reference checkpoints are torch pickles, read with ``weights_only=True`` so a
file cannot run code. The reference code writes two layouts, both accepted:

* ``{"teacher": {name: tensor}}``: the released weights (loaded by the reference's
  ``dinov2/inference/model.py``) and its periodic ``eval/<iter>/teacher_checkpoint.pth``;
* ``{"model": SSLMetaArch.state_dict(), "iteration": ..., "optimizer": ...}``: its training
  ``checkpoint.pth``, names prefixed ``student.`` / ``teacher.``.

Inside either, backbone weights are prefixed ``backbone.`` beside ``dino_head.`` (and
``ibot_head.``) weights; DDP may add ``module.`` components. Heads are dropped, the rest
must match the backbone exactly.

Our own checkpoints are a ``.safetensors`` file plus a ``.json`` sidecar holding the
architecture (to rebuild the module), the run config it came from and the weights' SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from voxelfm.errors import InputError
from voxelfm.utils.atomic import atomic_write_bytes, atomic_write_text

from .layers import rope_periods
from .vision_transformer import VisionTransformer3D, build_vit

_HEAD_PREFIXES = ("dino_head", "ibot_head")
_SUBMODELS = ("teacher", "student")
_BACKBONE_FORMAT = "voxelfm-backbone"
_BACKBONE_FORMAT_VERSION = 1
_DEFAULT_STEM = "backbone"
# Key lists in error messages are cut here so the message stays readable.
_MAX_KEYS_SHOWN = 8


def load_published_checkpoint(
    path: str | os.PathLike,
    preset: str = "base",
    which: str = "teacher",
    **overrides: Any,
) -> VisionTransformer3D:
    """Build the ``preset`` ViT and load a reference-format VoxelFM checkpoint into it.

    Args:
        path: a ``.pth`` file in one of the layouts described in the module docstring.
        preset: VIT_PRESETS name the checkpoint was trained with ("base" = published ViT-B).
        which: "teacher" (the EMA model the paper evaluates) or "student".
        **overrides: constructor options for checkpoints trained with a non-default config.

    Returns:
        The backbone on CPU in eval mode.

    Raises:
        InputError: the file is missing or unreadable, lacks the requested model, or its
            backbone keys/shapes do not match the preset exactly.
    """
    if which not in _SUBMODELS:
        raise ValueError(f"which must be one of {_SUBMODELS}, got {which!r}")
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    checkpoint = load_torch_file(path)

    submodel = _select_submodel(checkpoint, which, path)
    state_dict = _backbone_state_dict(submodel)
    model = build_vit(preset, **overrides)
    _load_strict(model, state_dict, path, description=f"the {preset!r} ViT preset")
    _check_rope_periods(model, path)
    return model.eval()


def load_torch_file(path: str | os.PathLike) -> Any:
    """The contents of a torch checkpoint file, loaded safely: tensors and plain containers
    only (``weights_only=True``), so a file cannot run code. The one loader of every torch
    file a user hands us (training checkpoints, published and foreign weights).

    Raises InputError naming the file for anything else. Torch's own message is not passed
    on: it tells the user to retry with the check turned off, which is exactly what a file
    that fails it must never get.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "file does not exist") from None
    except Exception as error:  # noqa: BLE001 -- torch raises many unrelated types
        if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
            reason = (
                "it holds objects other than tensors and plain containers, which could run "
                "code when loaded; it is refused"
            )
        else:
            reason = f"damaged, truncated or not a torch checkpoint ({type(error).__name__})"
        raise InputError(path, f"not a safe weights file: {reason}") from None


def save_backbone(
    model: VisionTransformer3D,
    path: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the backbone as safetensors plus a JSON sidecar, each file atomically.

    Args:
        model: the backbone to save (its ``architecture`` is recorded to rebuild it).
        path: a ``*.safetensors`` file (sidecar: same stem, ``.json``) or a directory
            (``backbone.safetensors`` + ``backbone.json`` inside it, created if needed).
        config: the resolved run configuration, stored verbatim for provenance; must be
            JSON-serialisable.

    Returns:
        The path of the weights file.

    The sidecar is written last and names the weights' SHA-256, so a sidecar always
    describes a complete weights file and a stale pair is detected on load.
    """
    weights_path, sidecar_path = _backbone_paths(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    payload = safetensors_save(tensors)
    sidecar = {
        "format": _BACKBONE_FORMAT,
        "format_version": _BACKBONE_FORMAT_VERSION,
        "architecture": model.architecture,
        "weights_file": weights_path.name,
        "weights_sha256": hashlib.sha256(payload).hexdigest(),
        "config": dict(config or {}),
    }
    try:
        sidecar_text = json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
    except TypeError as error:
        raise ValueError(f"config must be JSON-serialisable: {error}") from error
    atomic_write_bytes(weights_path, payload)
    atomic_write_text(sidecar_path, sidecar_text)
    return weights_path


def load_backbone(path: str | os.PathLike, **overrides: Any) -> VisionTransformer3D:
    """Rebuild a backbone written by :func:`save_backbone` (same ``path`` convention).

    Args:
        path: the ``.safetensors`` file or the directory given to save_backbone.
        **overrides: constructor options to change, e.g. ``drop_path_rate`` for fine-tuning;
            anything that changes parameter shapes fails the strict load.

    Returns:
        The backbone on CPU in eval mode.
    """
    weights_path, sidecar_path = _backbone_paths(path)
    for required in (weights_path, sidecar_path):
        if not required.is_file():
            raise InputError(required, "backbone checkpoint file not found")
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(sidecar_path, f"not valid JSON: {error}") from error
    if sidecar.get("format") != _BACKBONE_FORMAT:
        raise InputError(sidecar_path, f"not a {_BACKBONE_FORMAT} sidecar")
    if sidecar.get("format_version") != _BACKBONE_FORMAT_VERSION:
        raise InputError(
            sidecar_path,
            f"format_version {sidecar.get('format_version')} is not the supported "
            f"{_BACKBONE_FORMAT_VERSION}",
        )
    payload = weights_path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != sidecar["weights_sha256"]:
        raise InputError(weights_path, f"SHA-256 differs from the one recorded in {sidecar_path}")
    model = VisionTransformer3D(**{**sidecar["architecture"], **overrides})
    _load_strict(model, safetensors_load(payload), weights_path, description="its sidecar")
    return model.eval()


def _select_submodel(checkpoint: Any, which: str, path: Path) -> Mapping[str, Tensor]:
    """The teacher or student entries ({"backbone.*", "dino_head.*", ...}) of a checkpoint."""
    if not isinstance(checkpoint, Mapping):
        raise InputError(path, f"expected a dict checkpoint, got {type(checkpoint).__name__}")
    if "teacher" in checkpoint:  # released weights / reference eval checkpoints
        if which != "teacher":
            raise InputError(path, f"holds only teacher weights, {which!r} was requested")
        return checkpoint["teacher"]
    if "model" in checkpoint:  # reference training checkpoint: SSLMetaArch.state_dict()
        prefix = f"{which}."
        submodel = {
            name[len(prefix) :]: tensor
            for name, tensor in checkpoint["model"].items()
            if name.startswith(prefix)
        }
        if not submodel:
            raise InputError(path, f"its 'model' entry has no {prefix!r} weights")
        return submodel
    raise InputError(
        path, f"expected a 'teacher' or 'model' entry, found keys {sorted(checkpoint)[:10]}"
    )


def _backbone_state_dict(submodel: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the heads and strip ``backbone.`` and DDP ``module.`` from parameter names."""
    state_dict = {}
    for name, tensor in submodel.items():
        parts = [part for part in name.split(".") if part != "module"]
        if parts[0] in _HEAD_PREFIXES:
            continue
        if parts[0] == "backbone":
            parts = parts[1:]
        state_dict[".".join(parts)] = tensor
    return state_dict


def _load_strict(
    model: VisionTransformer3D, state_dict: Mapping[str, Tensor], path: Path, description: str
) -> None:
    """load_state_dict(strict=True), with one readable line naming every kind of mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{name} {tuple(state_dict[name].shape)} vs {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(state_dict))
        if state_dict[name].shape != expected[name].shape
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:_MAX_KEYS_SHOWN])}"
        + (", ..." if len(items) > _MAX_KEYS_SHOWN else "")
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (checkpoint vs model)", mismatched),
        )
        if items
    ]
    if problems:
        raise InputError(
            path, f"backbone weights do not match {description}: " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


def _check_rope_periods(model: VisionTransformer3D, path: Path) -> None:
    """The loaded RoPE periods must be the ones rope_base implies, or the preset is wrong."""
    rope = model.rope_embed
    if not torch.allclose(rope.periods, rope_periods(rope.head_dim, rope.base), rtol=1e-5):
        raise InputError(
            path,
            f"rope_embed.periods in the checkpoint do not match rope_base={rope.base}; "
            f"pass the rope_base the checkpoint was trained with",
        )


def _backbone_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, sidecar) for a ``*.safetensors`` file or a checkpoint directory."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / f"{_DEFAULT_STEM}.safetensors", path / f"{_DEFAULT_STEM}.json"
