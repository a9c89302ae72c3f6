"""Synthetic CT cohort: the embedded, download-free demo dataset.

A patient is a closed-form phantom in patient millimetres (``anatomy``); each scan draws a
pose, grid, noise and file encoding (``protocol``), samples the phantom on its grid
(``render``) and is written as NIfTI or DICOM (``writers``). Targets, survival and reports
are derived from what each scan shows (``outcomes``, ``report``); ``cohort`` ties it together.
No torch here: generation must run wherever the data pipeline runs.

The names below are imported on first use, so that reading ``tables`` (which the Snakefile
does at parse time) does not load SimpleITK, nibabel and scipy.
"""

from importlib import import_module

_EXPORTS = {
    "LABELS": "anatomy",
    "Lesion": "anatomy",
    "Phantom": "anatomy",
    "make_phantom": "anatomy",
    "generate_cohort": "cohort",
    "ScanPlan": "protocol",
    "draw_scan_plan": "protocol",
    "Acquisition": "render",
    "RenderedScan": "render",
    "render_scan": "render",
}

__all__ = [
    "LABELS",
    "Acquisition",
    "Lesion",
    "Phantom",
    "RenderedScan",
    "ScanPlan",
    "draw_scan_plan",
    "generate_cohort",
    "make_phantom",
    "render_scan",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'voxelfm.synth' has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
