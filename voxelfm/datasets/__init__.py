"""Public-dataset adapters: a dataset's own layout on disk -> manifest.csv + labels.csv.

Each adapter is ``adapt(root, out_dir, *, seed=0, split_fractions=(0.7, 0.1, 0.2),
**options) -> AdaptedDataset``; it reads only what is on disk (no downloads) and writes
``manifest.csv``, ``labels.csv`` (with a ``split`` column) and ``dataset.json`` (counts,
column descriptions, suggested ``evaluation.tasks`` configs) into ``out_dir``. The layout each
one expects is in its module docstring and in docs/datasets.md.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from voxelfm.datasets.common import AdaptedDataset
from voxelfm.errors import InputError, VoxelFMError

# name -> module; modules are imported on first use (nibabel, pydicom are not free).
_MODULES = {
    "ctrate": "voxelfm.datasets.ctrate",
    "rsna_pe": "voxelfm.datasets.rsna_pe",
    "nsclc_radiomics": "voxelfm.datasets.nsclc_radiomics",
    "osic": "voxelfm.datasets.osic",
    "luna16": "voxelfm.datasets.luna16",
    "totalsegmentator": "voxelfm.datasets.totalsegmentator",
    "shared_ct": "voxelfm.datasets.shared_ct",
}


def _lazy(module_name: str) -> Callable[..., AdaptedDataset]:
    def adapt(root, out_dir, **options) -> AdaptedDataset:
        return importlib.import_module(module_name).adapt(root, out_dir, **options)

    adapt.__name__ = f"{module_name.rsplit('.', 1)[1]}_adapt"
    adapt.__doc__ = f"``{module_name}.adapt`` (imported on first call)."
    return adapt


ADAPTERS: dict[str, Callable[..., AdaptedDataset]] = {
    name: _lazy(module) for name, module in _MODULES.items()
}


def adapter_summary(name: str) -> str:
    """First line of the adapter module's docstring (for ``voxelfm adapt --list``)."""
    module = importlib.import_module(_MODULES[name])
    return (module.__doc__ or "").strip().splitlines()[0]


def adapter_options(name: str) -> dict[str, Any]:
    """Keyword options of an adapter and their defaults."""
    signature = inspect.signature(importlib.import_module(_MODULES[name]).adapt)
    return {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}


def adapt_dataset(
    name: str, root: str | os.PathLike, out_dir: str | os.PathLike, **options: Any
) -> AdaptedDataset:
    """Run adapter ``name`` on the dataset at ``root``, writing into ``out_dir``.

    options: the adapter's keyword options (``seed``, ``split_fractions`` and its own, see
    ``adapter_options``); an unknown one is a VoxelFMError naming the known ones.
    """
    if name not in ADAPTERS:
        raise VoxelFMError(f"unknown dataset adapter {name!r}; known: {', '.join(ADAPTERS)}")
    known = adapter_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise VoxelFMError(
            f"adapter {name!r}: unknown option(s) {unknown}; known: {', '.join(known)}"
        )
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, f"expected the {name} dataset folder (it does not exist)")
    return ADAPTERS[name](root, Path(out_dir), **options)


__all__ = ["ADAPTERS", "AdaptedDataset", "adapt_dataset", "adapter_options", "adapter_summary"]
