"""Image readers, the DICOM writer, and resampling onto the canonical RAS grid.

No torch here: these run in ingestion workers and the synthetic generator.
"""

from voxelfm.io.canonical import CanonicalGrid, to_canonical
from voxelfm.io.dicom_write import write_dicom_series
from voxelfm.io.preprocess import preprocess_scan
from voxelfm.io.readers import read_image

__all__ = ["CanonicalGrid", "preprocess_scan", "read_image", "to_canonical", "write_dicom_series"]
