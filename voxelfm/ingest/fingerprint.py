"""A digest of everything that determines a stored scan, used to resume a shard.

Two runs with the same fingerprint produce the same stored scan, so a rerun skips scans
whose stored fingerprint matches: same input bytes (image file or every file of a DICOM
folder, and each label file), same target spacing, HU range, series choice and
PREPROCESSING_VERSION. Hashing re-reads the inputs, which costs a fraction of preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from voxelfm.conventions import PREPROCESSING_VERSION
from voxelfm.errors import InputError
from voxelfm.io.readers import sha256_of_files


def input_fingerprint(
    image: str | os.PathLike,
    labels: Mapping[str, str | os.PathLike],
    *,
    spacing: tuple[float, float, float] | None,
    hu_range: tuple[int, int],
    series_uid: str | None,
    rescale: tuple[float, float] | None = None,
) -> str:
    """SHA-256 over the inputs' bytes and the preprocessing parameters."""
    digest = hashlib.sha256()
    parameters = {
        "preprocessing_version": PREPROCESSING_VERSION,
        "spacing": None if spacing is None else [float(s) for s in spacing],
        "hu_range": [int(v) for v in hu_range],
        "series_uid": series_uid,
    }
    if rescale is not None:  # only when given, so existing stores keep their fingerprints
        parameters["rescale"] = [float(v) for v in rescale]
    digest.update(json.dumps(parameters, sort_keys=True).encode())
    for role, path in [("image", image), *sorted((f"label_{n}", p) for n, p in labels.items())]:
        digest.update(role.encode())
        for relative_name, file_digest in _file_digests(Path(path)):
            digest.update(f"{relative_name}\0{file_digest}\0".encode())
    return digest.hexdigest()


def _file_digests(path: Path) -> list[tuple[str, str]]:
    if path.is_file():
        return [(path.name, sha256_of_files([path]))]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [(p.relative_to(path).as_posix(), sha256_of_files([p])) for p in files]
    raise InputError(path, "does not exist")


def store_fingerprint(store: str | os.PathLike) -> str:
    """Content fingerprint of a shard store: what a model trained on it depends on.

    Per complete scan (in id order): its id, its patient and the digest of its content, which
    is the input fingerprint recorded at ingestion (inputs' bytes + preprocessing parameters
    + PREPROCESSING_VERSION) when present, else the SHA-256 of the scan's files. Re-ingesting
    other data (or with other parameters) at the same path changes it.
    """
    from voxelfm.store.layout import list_complete_scans

    store = Path(store)
    digest = hashlib.sha256()
    for scan_id in list_complete_scans(store):
        attributes = _group_attributes(store / scan_id)
        content = attributes.get("input_fingerprint") or _files_digest(store / scan_id)
        digest.update(f"{scan_id}\0{attributes.get('patient_id')}\0{content}\0".encode())
    return digest.hexdigest()


def _group_attributes(group: Path) -> dict:
    try:
        return json.loads((group / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _files_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for relative_name, file_digest in _file_digests(folder):
        digest.update(f"{relative_name}\0{file_digest}\0".encode())
    return digest.hexdigest()
