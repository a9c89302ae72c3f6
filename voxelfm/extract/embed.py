"""``voxelfm embed``: every scan of a set of shard stores through one backbone into one
embedding store.

The scans stream one by one from the volume stores through the extractor into
:func:`voxelfm.extract.store.write_embeddings` (which owns the store's layout and its atomic
write). A scan that fails costs only itself: a one-line warning on stderr and an entry in
the store's ``failed_scans``.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from voxelfm.errors import VoxelFMError
from voxelfm.extract.backbones import build_extractor
from voxelfm.extract.extractor import check_extraction_options, extract_features
from voxelfm.extract.interface import FeatureExtractor
from voxelfm.extract.store import EmbeddingRecord, write_embeddings
from voxelfm.store import VolumeStore


def embed_store(
    stores: str | os.PathLike | Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    config: Mapping[str, Any] | FeatureExtractor,
    *,
    name: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 4,
    mode: str = "auto",
    window: int | Sequence[int] | None = None,
    overlap: float = 0.5,
    max_patches: int | None = None,
    scan_ids: Sequence[str] | None = None,
    store_patches: bool = True,
    progress: bool = True,
    allow_empty: bool = False,
) -> Path:
    """Embed every scan of the shard ``stores`` with one backbone into ``out_path``.

    Args:
        stores: shard store(s) or a folder of them (as ``VolumeStore``).
        out_path: the embedding store to write (atomically; see ``write_embeddings``).
        config: backbone config for ``build_extractor`` (or a built extractor).
        name: the backbone's name in the store (overrides the config's ``name``).
        device, precision: see ``build_extractor``.
        batch_size, mode, window, overlap, max_patches: see ``extract_features``.
        scan_ids: a subset to embed (default: every complete scan, sorted).
        store_patches: also store the per-scan patch tokens.
        progress: a tqdm bar (rate, ETA) on stderr.
        allow_empty: stores without a complete scan give an empty embedding store (one
            shard of a scattered workflow) instead of an error.

    A scan that fails prints a one-line warning naming it on stderr and is listed in the
    store's ``failed_scans``; if every scan fails, VoxelFMError is raised and nothing is
    written.
    """
    extractor = _named_extractor(config, name, device, precision)
    options = {
        "mode": mode,
        "window": window,
        "overlap": overlap,
        "max_patches": max_patches,
        "batch_size": batch_size,
    }
    check_extraction_options(extractor, **options)
    volumes = VolumeStore(stores if isinstance(stores, (str, os.PathLike)) else list(stores))
    ids = _scans_to_embed(volumes, scan_ids, allow_empty)
    seen = _SeenPreprocessing()
    extraction = {
        **options,
        "device": str(extractor.device),
        "precision": getattr(extractor, "precision", "fp32"),
    }
    return write_embeddings(
        out_path,
        _embedded_scans(volumes, ids, extractor, options, seen, progress),
        extractor,
        mode=mode,
        extraction=extraction,
        preprocessing=lambda: seen.provenance(volumes, ids),
        store_patches=store_patches,
        allow_empty=allow_empty,
    )


def _named_extractor(
    config: Mapping[str, Any] | FeatureExtractor, name: str | None, device: str, precision: str
) -> FeatureExtractor:
    """The extractor ``config`` names (or is), called ``name`` when one is given."""
    if isinstance(config, FeatureExtractor):
        if name is None:
            return config
        renamed = copy.copy(config)  # a shallow copy: the caller's extractor is untouched
        renamed.name = name
        return renamed
    config = dict(config)
    if name is not None:
        config["name"] = name
    return build_extractor(config, device, precision=precision)


def _scans_to_embed(
    volumes: VolumeStore, scan_ids: Sequence[str] | None, allow_empty: bool
) -> list[str]:
    ids = list(volumes.scan_ids if scan_ids is None else scan_ids)
    unknown = [scan_id for scan_id in ids if scan_id not in volumes]
    if unknown:
        raise VoxelFMError(f"scans not in the stores: {', '.join(unknown[:5])}")
    if not ids and not allow_empty:
        raise VoxelFMError("the stores hold no complete scan to embed")
    return ids


@dataclass
class _SeenPreprocessing:
    """The preprocessing of the scans embedded so far, for the store's provenance."""

    spacing_mm: set[tuple] = field(default_factory=set)
    hu_range: set[tuple] = field(default_factory=set)
    version: set[str] = field(default_factory=set)

    def add(self, attrs: Mapping[str, Any]) -> None:
        self.spacing_mm.add(tuple(attrs["spacing"]))
        self.hu_range.add(tuple(attrs.get("hu_range") or ()))
        self.version.add(str(attrs.get("preprocessing_version")))

    def provenance(self, volumes: VolumeStore, ids: Sequence[str]) -> dict[str, Any]:
        return {
            "stores": sorted({str(volumes.store_path(scan_id)) for scan_id in ids}),
            "spacing_mm": sorted(list(s) for s in self.spacing_mm),
            "hu_range": sorted(list(r) for r in self.hu_range),
            "preprocessing_version": sorted(self.version),
        }


def _embedded_scans(
    volumes: VolumeStore,
    ids: Sequence[str],
    extractor: FeatureExtractor,
    options: Mapping[str, Any],
    seen: _SeenPreprocessing,
    progress: bool,
) -> Iterator[EmbeddingRecord]:
    """One record per scan, embedded as it is asked for; a failure is a record too."""
    bar = tqdm(
        ids,
        desc=f"embed {extractor.name}",
        unit="scan",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    for scan_id in bar:
        patient_id = ""
        try:
            attrs = volumes.attrs(scan_id)
            patient_id = str(attrs.get("patient_id", ""))
            features = extract_features(
                volumes.read_volume(scan_id),
                extractor,
                spacing=attrs["spacing"],
                origin=attrs["origin"],
                **options,
            )
        except Exception as error:  # noqa: BLE001 - one bad scan must not cost the cohort
            reason = _one_line(error)
            bar.write(f"voxelfm embed: warning: scan {scan_id}: {reason}", file=sys.stderr)
            yield EmbeddingRecord(scan_id, patient_id, error=reason)
            continue
        seen.add(attrs)
        yield EmbeddingRecord(scan_id, patient_id, features)
    bar.close()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
