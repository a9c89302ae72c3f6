"""The embedding store: one Zarr v3 group per (backbone, dataset), written atomically.

Layout of ``<out>.zarr``::

    zarr.json          root attributes:
                         format "voxelfm-embeddings", format_version 1, voxelfm_version
                         backbone      extractor.describe(): kind, name, spec, embed_dim,
                                       patch_size, normalisation, architecture, ...
                         embed_dim, patch_size, mode (requested), extraction (options)
                         preprocessing (source stores, spacing / HU range / version seen)
                         n_scans, scan_ids, patient_ids, modes (row order)
                         failed_scans  [{"scan_id", "error"}] scans that could not be embedded
    cls/               (N, D) float16, row n = scan_ids[n]; final-norm CLS / global vector
    pooled/            (N, D) float16, mean of the patch tokens
    patch/<scan_id>/   (gx, gy, gz, D) float16, one chunk per scan; attributes grid_affine
                       (4x4 token index -> RAS mm of the patch centre), grid_shape,
                       volume_shape, spacing, origin, mode, n_windows

The store is built in a temporary folder beside ``<out>`` and renamed into place when
complete (``voxelfm.utils.atomic.atomic_directory``): a failed run leaves no partial store
and an existing store is replaced only by a complete one. Patch tokens are written scan by
scan as they arrive, so a cohort's tokens never have to fit in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

import voxelfm
from voxelfm.errors import InputError, VoxelFMError
from voxelfm.extract.extractor import Features
from voxelfm.extract.interface import FeatureExtractor
from voxelfm.store.layout import SAFE_NAME_RULE, is_safe_name
from voxelfm.utils.atomic import atomic_directory
from voxelfm.utils.jsonable import to_jsonable

FORMAT = "voxelfm-embeddings"
FORMAT_VERSION = 1
PATCH_GROUP = "patch"
GLOBAL_KINDS = ("cls", "pooled", "cls+pooled")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class EmbeddingRecord:
    """One scan's result: its features, or the one-line reason it could not be embedded."""

    scan_id: str
    patient_id: str
    features: Features | None = None
    error: str | None = None


def write_embeddings(
    out_path: str | os.PathLike,
    records: Iterable[EmbeddingRecord],
    backbone: FeatureExtractor | Mapping[str, Any],
    *,
    mode: str = "auto",
    extraction: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | Any = None,
    store_patches: bool = True,
    allow_empty: bool = False,
) -> Path:
    """Write the embedding store (layout in the module docstring) atomically; returns it.

    Args:
        out_path: the store folder (``*.zarr``); replaced if it exists, once complete.
        records: EmbeddingRecord per scan, consumed lazily (a generator streams).
        backbone: the extractor, or its ``describe()`` mapping.
        mode, extraction: the extraction options, recorded in the attributes.
        preprocessing: provenance of the volumes (JSON-serialisable), or a callable
            returning it, called after ``records`` is exhausted.
        store_patches: also write the per-scan patch tokens.
        allow_empty: no records at all gives a store of 0 rows instead of an error (an
            empty shard of a scattered workflow; records that all failed are still one).

    Raises:
        VoxelFMError: no scan could be embedded (nothing is written), or two records share
            a scan id. A record whose features are not finite in float16 is listed as failed.
    """
    description = backbone.describe() if isinstance(backbone, FeatureExtractor) else dict(backbone)
    out_path = Path(out_path)
    with atomic_directory(out_path) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        patch_group = root.create_group(PATCH_GROUP) if store_patches else None
        scan_ids: list[str] = []
        patient_ids: list[str] = []
        modes: list[str] = []
        cls_rows: list[np.ndarray] = []
        pooled_rows: list[np.ndarray] = []
        failed: list[dict[str, str]] = []
        seen: set[str] = set()
        embed_dim: int | None = description.get("embed_dim")
        for record in records:
            if not is_safe_name(record.scan_id):
                raise VoxelFMError(f"scan_id {record.scan_id!r} {SAFE_NAME_RULE}")
            if record.scan_id in seen:
                raise VoxelFMError(f"scan_id {record.scan_id!r} appears twice")
            seen.add(record.scan_id)
            error = record.error or _feature_problem(record.features, embed_dim)
            if error is not None:
                failed.append({"scan_id": record.scan_id, "error": error})
                continue
            features = record.features
            assert features is not None
            embed_dim = int(features.cls.shape[0])
            scan_ids.append(record.scan_id)
            patient_ids.append(str(record.patient_id))
            modes.append(features.mode)
            cls_rows.append(features.cls.astype(np.float16))
            pooled_rows.append(features.pooled.astype(np.float16))
            if patch_group is not None and features.patch is not None:
                _write_patch(patch_group, record.scan_id, features)
        if not scan_ids and not (allow_empty and not failed):
            detail = f"; first: {failed[0]['scan_id']}: {failed[0]['error']}" if failed else ""
            raise VoxelFMError(
                f"no scan could be embedded ({len(failed)} failed){detail}; "
                f"{out_path} was not written"
            )
        for name, rows in (("cls", cls_rows), ("pooled", pooled_rows)):
            data = np.stack(rows) if rows else np.zeros((0, embed_dim or 0), np.float16)
            root.create_array(name, data=data, chunks=(max(1, len(data)), data.shape[1]))
        if callable(preprocessing):
            preprocessing = preprocessing()
        root.attrs.update(
            to_jsonable(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "voxelfm_version": voxelfm.__version__,
                    "backbone": description,
                    "embed_dim": embed_dim,
                    "patch_size": description.get("patch_size"),
                    "mode": mode,
                    "extraction": dict(extraction or {}),
                    "preprocessing": preprocessing,
                    "has_patch_tokens": patch_group is not None,
                    "n_scans": len(scan_ids),
                    "scan_ids": scan_ids,
                    "patient_ids": patient_ids,
                    "modes": modes,
                    "failed_scans": failed,
                }
            )
        )
    return out_path


def _feature_problem(features: Features | None, embed_dim: int | None) -> str | None:
    if features is None:
        return "no features"
    arrays = [features.cls, features.pooled] + ([] if features.patch is None else [features.patch])
    if embed_dim is not None and any(a.shape[-1] != embed_dim for a in arrays):
        return f"feature width {features.cls.shape[-1]} differs from the store's {embed_dim}"
    for array in arrays:
        if not np.isfinite(array).all() or np.abs(array).max() > _FLOAT16_MAX:
            return "features are not finite in float16"
    return None


def _write_patch(group: zarr.Group, scan_id: str, features: Features) -> None:
    data = features.patch.astype(np.float16)  # type: ignore[union-attr]
    array = group.create_array(scan_id, data=data, chunks=data.shape)
    array.attrs.update(
        to_jsonable(
            {
                "grid_affine": np.asarray(features.grid_affine).tolist(),
                "grid_shape": list(features.grid_shape or data.shape[:3]),
                "volume_shape": list(features.volume_shape),
                "spacing": list(features.spacing),
                "origin": list(features.origin),
                "mode": features.mode,
                "n_windows": features.n_windows,
            }
        )
    )


class EmbeddingStore:
    """Read an embedding store written by :func:`write_embeddings`, or the union of several.

    ``EmbeddingStore([shard_0.zarr, shard_1.zarr, ...])`` reads the stores one scattered
    ``embed`` job per shard wrote as one store: rows sorted by scan id (the order one store
    of all the shards has), failed scans and provenance merged. The parts must come from the
    same backbone with the same extraction options, and no scan may be in two of them.
    """

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike]):
        paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
        if not paths:
            raise VoxelFMError("no embedding store given")
        self._parts = [(p, *_open_embedding_group(p)) for p in paths]
        if len(paths) == 1:
            self.path = paths[0]
            self._attrs = self._parts[0][2]
        else:
            self.path = Path(os.path.commonpath([p.resolve() for p in paths]))
            self._attrs = _union_attrs(self._parts)
        # scan id -> (part index, row in that part), in the union's row order
        self._where: dict[str, tuple[int, int]] = {}
        for index, (_, _, attrs) in enumerate(self._parts):
            for row, scan_id in enumerate(attrs["scan_ids"]):
                self._where[scan_id] = (index, row)
        self._row = {scan_id: row for row, scan_id in enumerate(self.scan_ids)}

    def __len__(self) -> int:
        return len(self.scan_ids)

    def __repr__(self) -> str:
        parts = f", {len(self._parts)} parts" if len(self._parts) > 1 else ""
        return (
            f"EmbeddingStore({self.path}, backbone={self.backbone_name!r}, "
            f"{len(self)} scans{parts})"
        )

    @property
    def attrs(self) -> dict[str, Any]:
        return self._attrs

    @property
    def scan_ids(self) -> list[str]:
        return list(self._attrs["scan_ids"])

    @property
    def patient_ids(self) -> list[str]:
        return list(self._attrs["patient_ids"])

    @property
    def backbone(self) -> dict[str, Any]:
        return dict(self._attrs["backbone"])

    @property
    def backbone_name(self) -> str:
        return str(self._attrs["backbone"].get("name"))

    @property
    def embed_dim(self) -> int:
        return int(self._attrs["embed_dim"])

    @property
    def patch_size(self) -> int | None:
        return self._attrs.get("patch_size")

    @property
    def failed_scans(self) -> list[dict[str, str]]:
        return list(self._attrs.get("failed_scans", []))

    def global_features(
        self, kind: str = "cls", scan_ids: Sequence[str] | None = None
    ) -> np.ndarray:
        """(N, D) float32 rows in ``scan_ids`` order (default: the store's); "cls+pooled"
        concatenates the two, (N, 2D)."""
        if kind not in GLOBAL_KINDS:
            raise ValueError(f"kind must be one of {GLOBAL_KINDS}, got {kind!r}")
        parts = [self._global_array(name) for name in kind.split("+")]
        matrix = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        if scan_ids is None:
            return matrix
        return matrix[[self._row_of(scan_id) for scan_id in scan_ids]]

    def _global_array(self, name: str) -> np.ndarray:
        """One global array ("cls" or "pooled") of every part, in the union's row order."""
        if len(self._parts) == 1:
            return np.asarray(self._parts[0][1][name][...], dtype=np.float32)
        blocks = [np.asarray(root[name][...], dtype=np.float32) for _, root, _ in self._parts]
        return np.stack(
            [blocks[part][row] for part, row in (self._where[s] for s in self.scan_ids)]
        )

    def has_patch_tokens(self, scan_id: str) -> bool:
        self._row_of(scan_id)
        root = self._parts[self._where[scan_id][0]][1]
        return f"{PATCH_GROUP}/{scan_id}" in root

    def patch_tokens(self, scan_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(gx, gy, gz, D) float32 tokens and the (4, 4) token index -> RAS mm affine."""
        array = self._patch_array(scan_id)
        return np.asarray(array[...], dtype=np.float32), np.asarray(array.attrs["grid_affine"])

    def patch_geometry(self, scan_id: str) -> dict[str, Any]:
        """The attributes of the scan's token grid (grid_affine, grid_shape, volume_shape...)."""
        return self._patch_array(scan_id).attrs.asdict()

    def pooled_patch_grid(self, scan_id: str, grid: Sequence[int] = (4, 4, 4)) -> np.ndarray:
        """Patch tokens average-pooled to a fixed ``grid`` and flattened (C order): (T, D).

        Adaptive average pooling as ``torch.nn.functional.adaptive_avg_pool3d``: output
        cell o along an axis of n tokens averages tokens ``[floor(o*n/m), ceil((o+1)*n/m))``
        (m cells), so a token grid smaller than ``grid`` repeats tokens.
        """
        tokens, _ = self.patch_tokens(scan_id)
        return adaptive_avg_pool(tokens, tuple(int(g) for g in grid)).reshape(-1, tokens.shape[-1])

    def _patch_array(self, scan_id: str) -> zarr.Array:
        if not self.has_patch_tokens(scan_id):
            raise VoxelFMError(f"{self.path}: no patch tokens stored for scan {scan_id!r}")
        return self._parts[self._where[scan_id][0]][1][f"{PATCH_GROUP}/{scan_id}"]

    def _row_of(self, scan_id: str) -> int:
        try:
            return self._row[scan_id]
        except KeyError:
            raise KeyError(f"scan {scan_id!r} is not in {self!r}") from None


def _open_embedding_group(path: Path) -> tuple[zarr.Group, dict[str, Any]]:
    """The root group of one embedding store and its attributes, checked."""
    if not (path / "zarr.json").is_file():
        raise InputError(path, "not an embedding store (no zarr.json)")
    try:
        root = zarr.open_group(path, mode="r")
    except Exception as error:  # zarr raises several types for damaged metadata
        raise InputError(path, f"cannot open the Zarr group: {error}") from error
    attrs = root.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise InputError(path, f"not a {FORMAT} store")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise InputError(
            path,
            f"format_version {attrs.get('format_version')} is not the supported {FORMAT_VERSION}",
        )
    return root, attrs


# Attributes every part of a union must share: the same model, the same features.
_UNION_INVARIANTS = ("backbone", "embed_dim", "patch_size", "mode", "extraction")


def _union_attrs(parts: Sequence[tuple[Path, zarr.Group, dict[str, Any]]]) -> dict[str, Any]:
    """The attributes one store of all the parts would have (rows sorted by scan id)."""
    first_path, _, first = parts[0]
    owner: dict[str, Path] = {}
    rows: list[tuple[str, str, str]] = []
    for path, _, attrs in parts:
        for key in _UNION_INVARIANTS:
            if attrs.get(key) != first.get(key):
                raise InputError(
                    path, f"its {key} differs from {first_path}'s; not parts of one store"
                )
        for scan_id, patient_id, mode in zip(
            attrs["scan_ids"], attrs["patient_ids"], attrs["modes"]
        ):
            if scan_id in owner:
                raise InputError(path, f"scan {scan_id!r} is also in {owner[scan_id]}")
            owner[scan_id] = path
            rows.append((scan_id, patient_id, mode))
    if not rows:
        raise InputError(
            first_path.parent, f"none of the {len(parts)} embedding stores holds a scan"
        )
    rows.sort()
    provenance = [attrs.get("preprocessing") or {} for _, _, attrs in parts]
    preprocessing = {
        key: sorted({json_key for p in provenance for json_key in map(_hashable, p.get(key, []))})
        for key in ("stores", "spacing_mm", "hu_range", "preprocessing_version")
    }
    return {
        **first,
        "preprocessing": {k: [_unhashable(v) for v in vs] for k, vs in preprocessing.items()},
        "has_patch_tokens": all(attrs.get("has_patch_tokens") for _, _, attrs in parts),
        "n_scans": len(rows),
        "scan_ids": [r[0] for r in rows],
        "patient_ids": [r[1] for r in rows],
        "modes": [r[2] for r in rows],
        "failed_scans": sorted(
            (f for _, _, attrs in parts for f in attrs.get("failed_scans", [])),
            key=lambda f: f["scan_id"],
        ),
        "parts": [str(path) for path, _, _ in parts],
    }


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _unhashable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def adaptive_avg_pool(tokens: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    """(n0, n1, n2, D) -> (*grid, D) adaptive average pooling over the three grid axes."""
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive sizes, got {grid}")
    out = tokens.astype(np.float64)
    for axis, cells in enumerate(grid):
        n = out.shape[axis]
        bounds = [((o * n) // cells, -((-(o + 1) * n) // cells)) for o in range(cells)]
        out = np.stack(
            [out.take(range(lo, hi), axis=axis).mean(axis=axis) for lo, hi in bounds], axis=axis
        )
    return out.astype(np.float32)
