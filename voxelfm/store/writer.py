"""Write one preprocessed scan into a shard store, all or nothing.

The scan group is built under a hidden temporary name in the same store and renamed to
``<scan_id>`` once complete (see ``layout``). A process killed mid-write leaves only a
``.partial-*`` directory, which readers never list and ``remove_partial_scans`` deletes.
The rename is atomic on POSIX file systems, and the group's files are fsynced before it and
the store folder after it, so a committed scan also survives a power loss.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    ShardingCodec,
    ShardingCodecIndexLocation,
)

from voxelfm.conventions import HU_MAX, HU_MIN, PREPROCESSING_VERSION
from voxelfm.store.codecs import DEFAULT_CHUNKS, DEFAULT_COMPRESSOR, whole_volume_shard
from voxelfm.store.layout import (
    IMAGE_ARRAY,
    LABELS_GROUP,
    PARTIAL_PREFIX,
    SAFE_NAME_RULE,
    is_safe_name,
    list_partial_scans,
)
from voxelfm.utils.atomic import fsync_folder, fsync_tree
from voxelfm.utils.jsonable import to_jsonable
from voxelfm.volume import CanonicalVolume

# Provenance copied from CanonicalVolume.meta into the scan attributes. An allow-list, not a
# deny-list, so a reader that puts a DICOM header field into meta can never leak it here.
PROVENANCE_KEYS: tuple[str, ...] = (
    "original_shape",
    "original_spacing",
    "original_axcodes",
    "source_format",
    "source_sha256",
    "preprocessing_version",
    "hu_range",
    "warnings",
)
_PROVENANCE_DEFAULTS: dict[str, Any] = {
    "preprocessing_version": PREPROCESSING_VERSION,
    "hu_range": [HU_MIN, HU_MAX],
    "warnings": [],
}


# Root-group attribute marking a folder as a shard store this tool created: only such a
# folder is ever renamed, resumed into or pruned (a tool never deletes what it did not make).
STORE_MARKER = "voxelfm_shard_store"


def open_store_for_writing(store_path: str | os.PathLike) -> zarr.Group:
    """The root group of a shard store, created (and marked as ours) when missing."""
    root = zarr.open_group(Path(store_path), mode="a", zarr_format=3)
    if STORE_MARKER not in root.attrs:
        root.attrs[STORE_MARKER] = {"preprocessing_version": PREPROCESSING_VERSION}
    return root


def is_voxelfm_store(path: str | os.PathLike) -> bool:
    """True when ``path`` is a shard store this tool wrote: its root group carries the
    marker, or (stores from before the marker) every entry is a scan group this tool wrote
    or a leftover of an interrupted write."""
    path = Path(path)
    root_metadata = _group_attributes(path)
    if root_metadata is None:
        return False
    if STORE_MARKER in root_metadata:
        return True
    for entry in path.iterdir():
        if entry.name == "zarr.json" or entry.name.startswith(PARTIAL_PREFIX):
            continue
        attributes = _group_attributes(entry) if entry.is_dir() else None
        if attributes is None or attributes.get("scan_id") != entry.name:
            return False
    return True


def _group_attributes(path: Path) -> dict[str, Any] | None:
    """The attributes of the Zarr v3 group at ``path``, or None when it is not one."""
    try:
        metadata = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metadata, dict) or metadata.get("node_type") != "group":
        return None
    attributes = metadata.get("attributes", {})
    return attributes if isinstance(attributes, dict) else None


def write_scan(
    store_path: str | os.PathLike,
    scan_id: str,
    patient_id: str,
    volume: CanonicalVolume,
    *,
    chunks: tuple[int, int, int] = DEFAULT_CHUNKS,
    compressor: BytesBytesCodec | None = DEFAULT_COMPRESSOR,
    input_fingerprint: str | None = None,
    qc: Mapping[str, Any] | None = None,
) -> None:
    """Store ``volume`` as group ``scan_id`` of the shard store at ``store_path``.

    Each array is one Zarr shard (a single file) of ``chunks``-sized inner chunks, so a
    crop read opens one file and decodes only the chunks it overlaps, and a store of many
    scans stays at a handful of files per scan. Replaces an existing scan of the same id. ``input_fingerprint`` (a digest of the inputs
    and preprocessing parameters) and ``qc`` (per-scan quality numbers) are kept in the
    attributes so a resumed shard can skip the scan and still report its QC.
    """
    if not is_safe_name(scan_id):
        raise ValueError(f"scan_id {scan_id!r} {SAFE_NAME_RULE}")
    store_path = Path(store_path)
    root = open_store_for_writing(store_path)
    partial_name = f"{PARTIAL_PREFIX}{scan_id}.{uuid.uuid4().hex}"
    layout = {
        "chunks": chunks,
        "shards": whole_volume_shard(volume.image.shape, chunks),
        "compressors": () if compressor is None else (compressor,),
    }
    try:
        group = root.create_group(partial_name)
        _create_array(
            group,
            IMAGE_ARRAY,
            np.ascontiguousarray(volume.image, dtype=np.int16),
            HU_MIN,
            layout,
            store_path / partial_name / IMAGE_ARRAY,
        )
        if volume.labels:
            labels_group = group.create_group(LABELS_GROUP)
            for name, label in sorted(volume.labels.items()):
                if not is_safe_name(name):
                    raise ValueError(f"label name {name!r} {SAFE_NAME_RULE}")
                _create_array(
                    labels_group,
                    name,
                    _as_label_dtype(label, scan_id, name),
                    0,
                    layout,
                    store_path / partial_name / LABELS_GROUP / name,
                )
        group.attrs.update(_scan_attributes(scan_id, patient_id, volume, input_fingerprint, qc))
        _commit(store_path / partial_name, store_path / scan_id)
    finally:
        shutil.rmtree(store_path / partial_name, ignore_errors=True)


def _create_array(
    group: zarr.Group,
    name: str,
    data: np.ndarray,
    fill_value: int,
    layout: Mapping[str, Any],
    array_dir: Path,
) -> None:
    """Create array ``name`` holding ``data``: zarr writes the metadata and, for layouts
    ``_write_shard`` knows, the shard file is encoded here directly (zarr's own write
    schedules every chunk through its async pipeline, several times slower)."""
    array = group.create_array(
        name, shape=data.shape, dtype=data.dtype, fill_value=fill_value, **layout
    )
    encode = _shard_chunk_encoder(array)
    if encode is None:
        array[...] = data
    else:
        _write_shard(array_dir, data, fill_value, layout["chunks"], layout["shards"], encode)


def _shard_chunk_encoder(array: zarr.Array) -> Callable[[np.ndarray], bytes] | None:
    """The encoder of one inner chunk when ``array`` is one whole-array shard in the layout
    ``write_scan`` creates (index at the end with a CRC32C, no compressor or one Blosc
    compressor), else None."""
    meta = array.metadata
    if len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
        return None
    sharding = meta.codecs[0]
    if tuple(meta.chunk_grid.chunk_shape) != whole_volume_shard(array.shape, sharding.chunk_shape):
        return None
    if sharding.index_location != ShardingCodecIndexLocation.end or tuple(
        sharding.index_codecs
    ) != (BytesCodec(endian="little"), Crc32cCodec()):
        return None
    codecs = tuple(sharding.codecs)
    if not codecs or codecs[0] != BytesCodec(endian="little") or sys.byteorder != "little":
        return None
    if len(codecs) == 1:
        return lambda chunk: chunk.tobytes()
    if len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
        blosc = codecs[1]
        if blosc.typesize not in (None, array.dtype.itemsize):
            return None
        cname = blosc.cname.value.encode()
        shuffle = _BLOSC_SHUFFLE_IDS[blosc.shuffle.value]
        clevel, blocksize = int(blosc.clevel), int(blosc.blocksize)
        return lambda chunk: numcodecs.blosc.compress(chunk, cname, clevel, shuffle, blocksize)
    return None


_BLOSC_SHUFFLE_IDS = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
_EMPTY_ENTRY = np.uint64(2**64 - 1)  # shard index (offset, nbytes) of an unwritten chunk


def _write_shard(
    array_dir: Path,
    data: np.ndarray,
    fill_value: int,
    chunks: tuple[int, ...],
    shard_shape: tuple[int, ...],
    encode: Callable[[np.ndarray], bytes],
) -> None:
    """Write ``data`` as the array's single shard file ``c/0/0/0`` (Zarr v3 sharding: the
    encoded inner chunks, then the index of (offset, nbytes) pairs and its CRC32C).

    Like zarr, chunks holding only ``fill_value`` are not stored, and no file is written
    when every chunk is empty. Edge chunks are padded with ``fill_value`` to full size.
    """
    grid = tuple(s // c for s, c in zip(shard_shape, chunks))
    index = np.full((*grid, 2), _EMPTY_ENTRY, dtype="<u8")
    pieces: list[bytes] = []
    offset = 0
    padded = np.empty(chunks, dtype=data.dtype)
    for chunk_index in itertools.product(*map(range, grid)):  # C order
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(chunk_index, chunks))
        block = data[region]
        if block.shape != tuple(chunks):
            padded[...] = fill_value
            padded[tuple(slice(0, n) for n in block.shape)] = block
            block = padded
        if (block == fill_value).all():
            continue
        encoded = encode(np.ascontiguousarray(block))
        index[chunk_index] = (offset, len(encoded))
        pieces.append(encoded)
        offset += len(encoded)
    if not pieces:
        return
    index_bytes = index.tobytes()
    pieces.append(index_bytes)
    pieces.append(np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes())
    path = array_dir.joinpath("c", *("0" for _ in shard_shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream:
        stream.writelines(pieces)


def delete_scan(store_path: str | os.PathLike, scan_id: str) -> None:
    """Remove scan ``scan_id`` from the store if present (hiding it first, atomically)."""
    if not is_safe_name(scan_id):
        raise ValueError(f"scan_id {scan_id!r} {SAFE_NAME_RULE}")
    final = Path(store_path) / scan_id
    if final.is_dir():
        doomed = final.with_name(f"{PARTIAL_PREFIX}deleted-{scan_id}.{uuid.uuid4().hex}")
        os.rename(final, doomed)
        shutil.rmtree(doomed)


def remove_partial_scans(store_path: str | os.PathLike) -> int:
    """Delete leftovers of interrupted writes; only safe while no writer uses the store."""
    leftovers = list_partial_scans(store_path)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return len(leftovers)


def _commit(partial: Path, final: Path) -> None:
    # rename() cannot replace a non-empty directory, so an existing scan is first moved aside
    # under a hidden name: readers briefly see no scan, never a half-written one.
    fsync_tree(partial)
    if final.exists():
        doomed = final.with_name(f"{PARTIAL_PREFIX}replaced-{final.name}.{uuid.uuid4().hex}")
        os.rename(final, doomed)
        os.rename(partial, final)
        fsync_folder(final.parent)
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        os.rename(partial, final)
        fsync_folder(final.parent)


def _as_label_dtype(label: np.ndarray, scan_id: str, name: str) -> np.ndarray:
    """Label maps are stored as uint8 when they fit, else uint16."""
    if label.size and (label.min() < 0 or label.max() > np.iinfo(np.uint16).max):
        raise ValueError(
            f"scan {scan_id!r} label {name!r}: values must lie in 0..65535, "
            f"got {label.min()}..{label.max()}"
        )
    if not np.array_equal(label, np.round(label)):
        raise ValueError(f"scan {scan_id!r} label {name!r}: values must be integers")
    dtype = np.uint8 if label.size == 0 or label.max() <= np.iinfo(np.uint8).max else np.uint16
    return np.ascontiguousarray(label, dtype=dtype)


def _scan_attributes(
    scan_id: str,
    patient_id: str,
    volume: CanonicalVolume,
    input_fingerprint: str | None,
    qc: Mapping[str, Any] | None,
) -> dict[str, Any]:
    provenance = {
        key: volume.meta.get(key, _PROVENANCE_DEFAULTS.get(key)) for key in PROVENANCE_KEYS
    }
    attrs = {
        "scan_id": scan_id,
        "patient_id": str(patient_id),
        "shape": list(volume.image.shape),
        "spacing": list(volume.spacing),
        "origin": list(volume.origin),
        "axcodes": "".join(volume.axcodes),
        "affine": volume.affine.tolist(),
        **provenance,
        "labels": sorted(volume.labels),
        "input_fingerprint": input_fingerprint,
        "qc": dict(qc) if qc is not None else None,
    }
    return to_jsonable(attrs)
