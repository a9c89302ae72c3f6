"""The canonical volume convention shared by every stage.

World coordinates are RAS+ millimetres (the NIfTI / nibabel scanner frame: +x Right,
+y Anterior, +z Superior). DICOM and ITK use LPS; readers convert, nothing downstream does.

Canonical arrays have shape (X, Y, Z) with array axis 0 increasing toward Right, axis 1
toward Anterior and axis 2 toward Superior, on an axis-aligned grid (oblique acquisitions
are resampled onto it). Voxel (i, j, k) has its centre at ``origin + (i, j, k) * spacing``,
so the affine is diagonal: ``diag(spacing) | origin``.

HU: every reader applies the file's own rescale (DICOM RescaleSlope/Intercept, NIfTI
scl_slope/scl_inter) and then the single clip range below, so padding values such as -3024
and -2048 become air and metal streaks saturate at the 12-bit CT maximum.
"""

from __future__ import annotations

CANONICAL_AXCODES: tuple[str, str, str] = ("R", "A", "S")

HU_MIN: int = -1024
HU_MAX: int = 3071

# Isotropic, so the random axis permutation used in pretraining is physically meaningful;
# 1.5 mm keeps a typical 0.7x0.7x1.25 mm chest CT near 240^3 voxels (a 112^3 crop then spans
# 168 mm) while a 3 mm nodule still covers two voxels.
DEFAULT_SPACING_MM: tuple[float, float, float] = (1.5, 1.5, 1.5)

# Bump when the preprocessing output changes for the same input and parameters.
PREPROCESSING_VERSION: str = "1"
