"""The Zarr volume store: one Zarr v3 store per shard, one group per scan.

Layout of ``<root>/shard_XXX.zarr``::

    zarr.json
    <scan_id>/zarr.json              attributes: geometry, provenance, qc (see writer)
    <scan_id>/image/                 int16 HU, shape (X, Y, Z), RAS
    <scan_id>/labels/<name>/         uint8 or uint16, same shape, 0 = background

No torch here: the store is read by training and written by ingestion alike.
"""

from voxelfm.store.codecs import (
    DEFAULT_CHUNKS,
    DEFAULT_COMPRESSOR,
    DEFAULT_COMPRESSOR_NAME,
    make_compressor,
)
from voxelfm.store.layout import is_safe_name, list_complete_scans, shard_store_name
from voxelfm.store.reader import VolumeStore
from voxelfm.store.writer import delete_scan, remove_partial_scans, write_scan

__all__ = [
    "DEFAULT_CHUNKS",
    "DEFAULT_COMPRESSOR",
    "DEFAULT_COMPRESSOR_NAME",
    "VolumeStore",
    "delete_scan",
    "is_safe_name",
    "list_complete_scans",
    "make_compressor",
    "remove_partial_scans",
    "shard_store_name",
    "write_scan",
]
