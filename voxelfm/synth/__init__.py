"""Synthetic CT cohort: the embedded, download-free demo dataset.

A patient is a closed-form phantom in patient millimetres (``anatomy``); each scan draws a
pose, grid, noise and file encoding (``protocol``), samples the phantom on its grid
(``render``) and is written as NIfTI or DICOM (``writers``). Targets, survival and reports
are derived from what each scan shows (``outcomes``, ``report``); ``cohort`` ties it together.
No torch here: generation must run wherever the data pipeline runs.
"""

from voxelfm.synth.anatomy import LABELS, Lesion, Phantom, make_phantom
from voxelfm.synth.cohort import generate_cohort
from voxelfm.synth.protocol import ScanPlan, draw_scan_plan
from voxelfm.synth.render import Acquisition, RenderedScan, render_scan

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
