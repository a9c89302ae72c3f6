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
