"""What the Snakefile loads when it parses: every job of a cluster run parses it again.

``workflow/rules/common.smk`` imports ``voxelfm.config_checks`` and ``voxelfm.versions``; the
checks it runs import the task language (``evaluation.tasks``, and through it the task
categories and the probe registry), the manifest reader and the synthetic cohort's tables.
None of that may load a probe library, torch, the plotting stack or the image readers.
"""

from __future__ import annotations

import subprocess
import sys

PARSE_TIME_MODULES = (
    "voxelfm.config_checks",
    "voxelfm.versions",
    "voxelfm.evaluation.tasks",
    "voxelfm.ingest.manifest",
    "voxelfm.synth.tables",
)
HEAVY = ("sklearn", "scipy.stats", "lifelines", "torch", "matplotlib", "SimpleITK", "nibabel")


def test_what_the_snakefile_parses_imports_nothing_heavy():
    code = (
        "import importlib, sys\n"
        f"for name in {PARSE_TIME_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "from voxelfm.config_checks import synthetic_columns\n"
        "synthetic_columns('labels.csv')\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    assert result.stdout.split() == []


def test_the_cohort_writes_the_columns_the_checks_read(tmp_path):
    """``config_checks`` reads the synthetic tables' columns from ``synth.tables``; the
    generator must write exactly those."""
    import pandas as pd

    from voxelfm.config_checks import synthetic_columns
    from voxelfm.synth import generate_cohort
    from voxelfm.synth.tables import SCAN_TABLES

    generate_cohort(tmp_path / "cohort", n_patients=4, shape_range=(32, 40), progress=False)
    for table in SCAN_TABLES:
        written = list(pd.read_csv(tmp_path / "cohort" / table, nrows=0).columns)
        assert written == synthetic_columns(table)
