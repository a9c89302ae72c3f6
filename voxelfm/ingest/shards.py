"""Split a manifest into shards and ingest one shard into one Zarr store.

A shard is the unit of work of one Snakemake job: ``shard_XXX.csv`` in, and out
``shard_XXX.zarr`` (one group per scan, see ``voxelfm.store``), ``failures.csv`` and
``qc.csv``. Inside a shard, scans are preprocessed in parallel by dask's threaded scheduler
with at most ``workers`` scans in flight; each task writes its scan straight to the store
and returns only a small row, so memory stays at a few volumes whatever the shard size.

Outputs appear atomically. The store is built as ``shard_XXX.zarr.partial`` and renamed at
the end; a rerun after a crash (or of a finished shard) resumes from it, skipping every
stored scan whose input fingerprint (inputs + preprocessing parameters) is unchanged. Only a
store this tool wrote is ever resumed, pruned or replaced: any other folder at either name
is refused, untouched.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import pandas as pd
import zarr
from tqdm import tqdm

from voxelfm.conventions import DEFAULT_SPACING_MM, HU_MAX, HU_MIN
from voxelfm.errors import InputError, VoxelFMError
from voxelfm.ingest.fingerprint import input_fingerprint
from voxelfm.ingest.manifest import SERIES_UID_COLUMN, label_paths, read_manifest, rescale_of
from voxelfm.ingest.qc import scan_qc
from voxelfm.io.geometry import DEFAULT_LIMITS, GeometryLimits
from voxelfm.store.layout import list_complete_scans
from voxelfm.store.writer import (
    delete_scan,
    is_voxelfm_store,
    open_store_for_writing,
    remove_partial_scans,
    write_scan,
)
from voxelfm.utils.atomic import fsync_folder, write_csv_atomically

FAILURE_COLUMNS = ["scan_id", "image", "error_type", "reason"]
QC_ID_COLUMNS = ["scan_id", "patient_id"]
PARTIAL_STORE_SUFFIX = ".partial"
_ZARR_WRITE_BATCH = 64


def shard_manifest_name(index: int) -> str:
    return f"shard_{index:03d}.csv"


def split_manifest(
    manifest: str | os.PathLike | pd.DataFrame, n_shards: int, out_dir: str | os.PathLike
) -> list[Path]:
    """Write ``n_shards`` shard manifests ``shard_000.csv``... to ``out_dir``.

    A patient's scans stay in one shard; patients go, largest first, to the shard with the
    fewest rows so far (ties to the lowest index). Deterministic for a given manifest. Rows
    keep their manifest order inside a shard and their absolute paths. A shard can be empty
    when there are fewer patients than shards.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be at least 1, got {n_shards}")
    table = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    rows_of_patient = table.groupby("patient_id", sort=False).indices  # first-seen order
    by_size = sorted(rows_of_patient.values(), key=len, reverse=True)  # stable: ties keep order
    shard_rows: list[list[int]] = [[] for _ in range(n_shards)]
    for rows in by_size:
        smallest = min(range(n_shards), key=lambda s: (len(shard_rows[s]), s))
        shard_rows[smallest].extend(rows)
    out_dir = Path(out_dir)
    paths = []
    for index, rows in enumerate(shard_rows):
        path = out_dir / shard_manifest_name(index)
        write_csv_atomically(table.iloc[sorted(rows)], path)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class ShardReport:
    """What one run_shard call did."""

    stored: int  # preprocessed and written in this run
    resumed: int  # already stored with the same fingerprint, skipped
    failed: int


def run_shard(
    shard_manifest_csv: str | os.PathLike,
    out_store: str | os.PathLike,
    failures_csv: str | os.PathLike,
    qc_csv: str | os.PathLike,
    *,
    spacing: tuple[float, float, float] | None = DEFAULT_SPACING_MM,
    hu_range: tuple[int, int] = (HU_MIN, HU_MAX),
    strict: bool = False,
    workers: int = 2,
    progress: bool = True,
    limits: GeometryLimits = DEFAULT_LIMITS,
) -> ShardReport:
    """Preprocess every scan of a shard manifest into the store ``out_store``.

    A scan that raises is recorded in ``failures_csv`` (scan_id, image, error_type, reason
    on one line) and the others continue; with ``strict`` the first failure is raised
    instead (a VoxelFMError carries its one-line reason) and missing files fail the
    manifest check up front. A scan whose voxel size or count is outside ``limits`` fails. ``qc_csv`` gets one row per stored scan (see ``qc.scan_qc``).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    manifest = read_manifest(shard_manifest_csv, strict=strict, allow_empty=True)
    out_store = Path(out_store)
    work_store = _work_store(out_store)
    open_store_for_writing(work_store)  # before the threads, so they never race to create it
    remove_partial_scans(work_store)
    for stale in set(list_complete_scans(work_store)) - set(manifest["scan_id"]):
        delete_scan(work_store, stale)

    settings = {"spacing": spacing, "hu_range": hu_range, "strict": strict, "limits": limits}
    bar = tqdm(total=len(manifest), desc=out_store.name, unit="scan", disable=not progress)
    bar_lock = threading.Lock()
    tasks = [
        dask.delayed(_ingest_scan, pure=False)(row, work_store, settings, bar, bar_lock)
        for _, row in manifest.iterrows()
    ]
    try:
        # Larger codec batches halve zarr's per-chunk overhead when writing many small chunks.
        with zarr.config.set({"codec_pipeline.batch_size": _ZARR_WRITE_BATCH}):
            outcomes = dask.compute(*tasks, scheduler="threads", num_workers=workers)
    finally:
        bar.close()

    qc_rows = [row for status, row in outcomes if status != "failed"]
    failure_rows = [row for status, row in outcomes if status == "failed"]
    write_csv_atomically(_qc_table(qc_rows), qc_csv)
    write_csv_atomically(pd.DataFrame(failure_rows, columns=FAILURE_COLUMNS), failures_csv)
    if out_store.exists():
        shutil.rmtree(out_store)
    os.rename(work_store, out_store)
    fsync_folder(out_store.parent)
    statuses = [status for status, _ in outcomes]
    return ShardReport(
        statuses.count("stored"), statuses.count("resumed"), statuses.count("failed")
    )


def _work_store(out_store: Path) -> Path:
    """The store to build in: a previous partial run, else a finished one, else new."""
    work_store = out_store.with_name(out_store.name + PARTIAL_STORE_SUFFIX)
    for existing in (out_store, work_store):
        if existing.exists() and not is_voxelfm_store(existing):
            raise InputError(
                existing,
                "exists and is not a VoxelFM shard store; refusing to replace or delete it "
                "(move it away or choose another --store)",
            )
    if out_store.exists() and not work_store.exists():
        os.rename(out_store, work_store)  # a finished shard rerun: resume from it
    return work_store


def _ingest_scan(
    row: pd.Series, store: Path, settings: Mapping[str, Any], bar: tqdm, bar_lock: threading.Lock
) -> tuple[str, dict[str, Any]]:
    """Preprocess and store one scan: ('stored' | 'resumed', qc row) or ('failed', row)."""
    from voxelfm.io.preprocess import preprocess_scan  # SimpleITK: only where it is used

    scan_id, patient_id, image = row["scan_id"], row["patient_id"], row["image"]
    labels = label_paths(row)
    series_uid = row.get(SERIES_UID_COLUMN) or None
    started = time.perf_counter()
    try:
        rescale = rescale_of(row)
        fingerprint = input_fingerprint(
            image,
            labels,
            spacing=settings["spacing"],
            hu_range=settings["hu_range"],
            series_uid=series_uid,
            rescale=rescale,
        )
        stored_qc = _stored_qc_if_current(store, scan_id, patient_id, fingerprint)
        if stored_qc is not None:
            return "resumed", stored_qc
        volume = preprocess_scan(
            image,
            labels,
            spacing=settings["spacing"],
            hu_range=settings["hu_range"],
            series_uid=series_uid,
            rescale=rescale,
            limits=settings["limits"],
        )
        qc = {"scan_id": scan_id, "patient_id": patient_id, **scan_qc(volume)}
        qc["elapsed_s"] = round(time.perf_counter() - started, 3)
        write_scan(store, scan_id, patient_id, volume, input_fingerprint=fingerprint, qc=qc)
        return "stored", qc
    except Exception as error:
        if settings["strict"]:
            raise
        delete_scan(store, scan_id)  # a stale copy from an earlier run must not survive
        return "failed", _failure_row(scan_id, image, error)
    finally:
        with bar_lock:
            bar.update()


def _stored_qc_if_current(
    store: Path, scan_id: str, patient_id: str, fingerprint: str
) -> dict[str, Any] | None:
    """The stored QC row if ``scan_id`` is stored from the same inputs, parameters and
    patient, else None."""
    if not (store / scan_id).is_dir():
        return None
    attrs = zarr.open_group(store, path=scan_id, mode="r").attrs
    current = (
        attrs.get("input_fingerprint") == fingerprint and attrs.get("patient_id") == patient_id
    )
    return dict(attrs["qc"]) if current and attrs.get("qc") else None


def _failure_row(scan_id: str, image: str, error: Exception) -> dict[str, str]:
    if isinstance(error, InputError) and error.path == image:
        reason = error.reason  # the image column already names the file
    elif isinstance(error, VoxelFMError):
        reason = str(error)
    else:
        reason = f"{type(error).__name__}: {error}"
    return {
        "scan_id": scan_id,
        "image": image,
        "error_type": type(error).__name__,
        "reason": " ".join(reason.split()),  # one line, whatever the exception said
    }


def _qc_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=QC_ID_COLUMNS)
    return table.sort_values("scan_id", kind="stable").reset_index(drop=True)
