"""The SSL recipe as a resolved mapping: package defaults plus a run's overrides.

This mapping is the recipe's config: it is saved beside every checkpoint and its hash names
the run's work folder. ``voxelfm.train.settings.SSLSettings.from_config`` validates it into
the typed settings the training code reads.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

from voxelfm.errors import VoxelFMError

# Sub-dictionaries whose keys are free-form (passed through to a constructor).
_OPEN_KEYS = {("model", "overrides")}


def default_ssl_config() -> dict[str, Any]:
    text = resources.files("voxelfm.configs").joinpath("ssl_default.yaml").read_text()
    return yaml.safe_load(text)


def merge_overrides(
    base: Mapping[str, Any], overrides: Mapping[str, Any], _path: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``; unknown keys are errors (typo guard)."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        path = (*_path, key)
        if _path in _OPEN_KEYS:
            merged[key] = copy.deepcopy(value)
        elif key not in merged:
            raise VoxelFMError(
                f"unknown SSL config key {'.'.join(path)!r}; known keys here: "
                f"{', '.join(sorted(merged))}"
            )
        elif isinstance(merged[key], dict) and path not in _OPEN_KEYS:
            if not isinstance(value, Mapping):
                raise VoxelFMError(f"SSL config key {'.'.join(path)!r} must be a mapping")
            merged[key] = merge_overrides(merged[key], value, path)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_ssl_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults with ``overrides`` applied: the whole config of a run."""
    return merge_overrides(default_ssl_config(), overrides or {})


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a resolved config: names the resumable work folder of a run."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
