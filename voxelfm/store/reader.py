"""Read scans and random 3D crops from a set of shard stores.

Block reads go through ``ChunkReader`` (decodes only the overlapped chunks, without zarr's
per-chunk scheduling overhead); arrays in a layout it does not handle are read with zarr's
own slicing, which gives identical values.

``VolumeStore`` is what the pretraining dataset holds: it is cheap to pickle (only the
scan-to-shard index travels) and opens array handles lazily, once per process, so each
DataLoader worker gets its own handles after fork or spawn. Zarr itself resets its I/O
thread in forked children.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from voxelfm.conventions import HU_MIN
from voxelfm.errors import InputError
from voxelfm.store.chunk_reader import ChunkReader
from voxelfm.store.layout import IMAGE_ARRAY, LABELS_GROUP, is_store, list_complete_scans
from voxelfm.store.writer import PROVENANCE_KEYS
from voxelfm.volume import CanonicalVolume

Triple = tuple[int, int, int]


class VolumeStore:
    """All complete scans of one or more shard stores, addressed by scan id."""

    def __init__(self, root_or_store_paths: str | os.PathLike | Iterable[str | os.PathLike]):
        """``root_or_store_paths``: a shard store, a folder of ``*.zarr`` stores, or a list
        of stores. Raises InputError for a missing path, a folder without stores, or a scan id
        present in two stores."""
        self._shard_of: dict[str, Path] = {}
        for store_path in _resolve_store_paths(root_or_store_paths):
            for scan_id in list_complete_scans(store_path):
                if scan_id in self._shard_of:
                    raise InputError(
                        store_path,
                        f"scan_id {scan_id!r} is also stored in {self._shard_of[scan_id]}",
                    )
                self._shard_of[scan_id] = store_path
        self._reset_handles()

    # Pickling ships only the index; handles are reopened lazily in the receiving process.
    def __getstate__(self) -> dict[str, Any]:
        return {"_shard_of": self._shard_of}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._shard_of = state["_shard_of"]
        self._reset_handles()

    def __len__(self) -> int:
        return len(self._shard_of)

    def __contains__(self, scan_id: object) -> bool:
        return scan_id in self._shard_of

    def __repr__(self) -> str:
        shards = len(set(self._shard_of.values()))
        return f"VolumeStore({len(self)} scans in {shards} shard stores)"

    @property
    def scan_ids(self) -> list[str]:
        return sorted(self._shard_of)

    def store_path(self, scan_id: str) -> Path:
        """The shard store holding ``scan_id``."""
        return self._shard_of[self._known(scan_id)]

    def attrs(self, scan_id: str) -> dict[str, Any]:
        """The scan's attributes (spacing, origin, affine, provenance, qc...)."""
        if scan_id not in self._attrs:
            group = zarr.open_group(self._store(scan_id), path=scan_id, mode="r")
            self._attrs[scan_id] = group.attrs.asdict()
        return self._attrs[scan_id]

    def patient_id(self, scan_id: str) -> str:
        return self.attrs(scan_id)["patient_id"]

    def shape(self, scan_id: str) -> Triple:
        return tuple(self._array(scan_id, IMAGE_ARRAY).shape)

    def label_names(self, scan_id: str) -> list[str]:
        return list(self.attrs(scan_id).get("labels", []))

    def read_volume(self, scan_id: str) -> np.ndarray:
        """The whole int16 HU image, shape (X, Y, Z)."""
        return self.read_crop(scan_id, (0, 0, 0), self.shape(scan_id))

    def read_label(self, scan_id: str, name: str) -> np.ndarray:
        """A whole label map."""
        return self.read_label_crop(scan_id, name, (0, 0, 0), self.shape(scan_id))

    def read_crop(self, scan_id: str, start: Triple, size: Triple) -> np.ndarray:
        """int16 HU block ``[start, start + size)``; voxels outside the volume read HU_MIN.

        ``start`` may be negative and the block may exceed the volume, so a crop larger than
        a small volume still has the requested size.
        """
        return _padded_read(self._array(scan_id, IMAGE_ARRAY), start, size, HU_MIN)

    def read_crops(self, scan_id: str, crops: Sequence[tuple[Triple, Triple]]) -> list[np.ndarray]:
        """``[read_crop(scan_id, start, size) for start, size in crops]``, sharing the work.

        Each stored chunk is read and decoded once however many crops overlap it, so the
        crops of one multi-crop sample (which overlap: the global crops each other, the
        local crops the global ones) cost less together than one by one.
        """
        return _padded_reads(self._array(scan_id, IMAGE_ARRAY), crops, HU_MIN)

    def read_label_crop(self, scan_id: str, name: str, start: Triple, size: Triple) -> np.ndarray:
        """Label block ``[start, start + size)``; voxels outside the volume read 0."""
        return _padded_read(self._array(scan_id, f"{LABELS_GROUP}/{name}"), start, size, 0)

    def to_canonical_volume(self, scan_id: str) -> CanonicalVolume:
        """The scan as it was written (image, labels, geometry, provenance)."""
        attrs = self.attrs(scan_id)
        return CanonicalVolume(
            image=self.read_volume(scan_id),
            spacing=tuple(attrs["spacing"]),
            origin=tuple(attrs["origin"]),
            labels={name: self.read_label(scan_id, name) for name in self.label_names(scan_id)},
            meta={key: attrs[key] for key in PROVENANCE_KEYS if key in attrs},
        )

    def _known(self, scan_id: str) -> str:
        if scan_id not in self._shard_of:
            raise KeyError(f"scan {scan_id!r} is not in {self!r}")
        return scan_id

    def _reset_handles(self) -> None:
        self._owner_pid = os.getpid()
        self._stores: dict[Path, LocalStore] = {}
        self._arrays: dict[tuple[str, str], _ArrayHandle] = {}
        self._attrs: dict[str, dict[str, Any]] = {}

    def _store(self, scan_id: str) -> LocalStore:
        if self._owner_pid != os.getpid():  # inherited through fork: reopen in this process
            self._reset_handles()
        path = self.store_path(scan_id)
        if path not in self._stores:
            self._stores[path] = LocalStore(path, read_only=True)
        return self._stores[path]

    def _array(self, scan_id: str, array_path: str) -> _ArrayHandle:
        store = self._store(scan_id)
        key = (scan_id, array_path)
        if key not in self._arrays:
            path = f"{scan_id}/{array_path}"
            array = zarr.open_array(store, path=path, mode="r")
            self._arrays[key] = _ArrayHandle(array, ChunkReader.for_array(array, store.root / path))
        return self._arrays[key]


class _ArrayHandle:
    """An open array and, when its layout allows, the fast reader for it."""

    def __init__(self, array: zarr.Array, fast_reader: ChunkReader | None):
        self.array = array
        self.fast_reader = fast_reader
        self.shape: Triple = tuple(array.shape)
        self.dtype = array.dtype
        self.ndim = array.ndim

    def read(self, lo: Triple, hi: Triple) -> np.ndarray:
        """The block ``[lo, hi)`` inside the array."""
        return self.read_many([(lo, hi)])[0]

    def read_many(self, blocks: Sequence[tuple[Triple, Triple]]) -> list[np.ndarray]:
        """The blocks ``[lo, hi)``, each inside the array."""
        if self.fast_reader is not None:
            return self.fast_reader.read_many(blocks)
        return [self.array[tuple(slice(l, h) for l, h in zip(lo, hi))] for lo, hi in blocks]


def _resolve_store_paths(
    root_or_store_paths: str | os.PathLike | Iterable[str | os.PathLike],
) -> list[Path]:
    if isinstance(root_or_store_paths, (str, os.PathLike)):
        root = Path(root_or_store_paths)
        if is_store(root):
            return [root]
        if not root.is_dir():
            raise InputError(root, "no such shard store or folder of shard stores")
        stores = sorted(p for p in root.glob("*.zarr") if is_store(p))
        if not stores:
            raise InputError(root, "folder holds no Zarr shard stores (*.zarr)")
        return stores
    paths = [Path(p) for p in root_or_store_paths]
    for path in paths:
        if not is_store(path):
            raise InputError(path, "not a Zarr shard store (no zarr.json)")
    return paths


def _padded_read(array: _ArrayHandle, start: Triple, size: Triple, fill: int) -> np.ndarray:
    return _padded_reads(array, [(start, size)], fill)[0]


def _padded_reads(
    array: _ArrayHandle, crops: Sequence[tuple[Triple, Triple]], fill: int
) -> list[np.ndarray]:
    """Crops ``(start, size)`` of ``array``; voxels outside it read ``fill``."""
    blocks, plans = [], []
    for start, size in crops:
        if len(start) != array.ndim or len(size) != array.ndim or min(size) < 1:
            raise ValueError(f"crop start {start} / size {size} do not fit a {array.ndim}D array")
        start = tuple(int(s) for s in start)
        size = tuple(int(n) for n in size)
        lo = tuple(max(s, 0) for s in start)
        hi = tuple(min(s + n, dim) for s, n, dim in zip(start, size, array.shape))
        inside = all(h > l for l, h in zip(lo, hi))
        padded = any(s < 0 for s in start) or any(h - l != n for l, h, n in zip(lo, hi, size))
        plans.append((start, size, lo, hi, len(blocks) if inside else None, padded))
        if inside:
            blocks.append((lo, hi))
    read = array.read_many(blocks) if blocks else []
    out = []
    for start, size, lo, hi, block, padded in plans:
        if not padded:  # entirely inside: no padding copy
            out.append(read[block])
            continue
        crop = np.full(size, fill, dtype=array.dtype)
        if block is not None:
            crop[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))] = read[block]
        out.append(crop)
    return out
