"""The probe registry: the fit/select contract and where test data enters."""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

from voxelfm.errors import VoxelFMError
from voxelfm.probes.fitted import FittedProbe
from voxelfm.probes.registry import PROBE_FITTERS, evaluate, metric_functions, probe_fitter


@pytest.mark.parametrize(
    ("task", "name"), [(t, n) for t, names in PROBE_FITTERS.items() for n in names]
)
def test_fitters_take_train_and_validation_arrays_only(task, name):
    """Selection cannot see test rows: neither the registry's entry nor the fitter it loads
    has a parameter to receive them."""
    entry = probe_fitter(task, name)
    for fitter in (entry, entry.load()):
        parameters = list(inspect.signature(fitter).parameters.values())
        positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert [p.rsplit("_", 1)[1] for p in positional] == ["train", "train", "val", "val"]
        assert not any("test" in p.name for p in parameters)
        assert "seed" in {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}


def test_unknown_probe_lists_the_known_ones():
    with pytest.raises(VoxelFMError, match="unknown probe 'svm'.*logistic"):
        probe_fitter("classification", "svm")


def test_evaluate_scores_each_task_with_its_metrics():
    y = np.array([[1.0, 1], [2.0, 0], [3.0, 1], [4.0, 1]])  # (time, event)
    survival_probe = FittedProbe("survival", "fixed", {}, 1.0, predict=lambda X: -X[:, 0])
    # risk decreasing with time -> perfectly concordant
    assert evaluate(survival_probe, y[:, :1], y) == {"c_index": 1.0}
    regression_probe = FittedProbe("regression", "fixed", {}, 1.0, predict=lambda X: X[:, 0] + 1)
    assert set(metric_functions(regression_probe)) == {"mae", "r2", "pearson_r"}
    assert evaluate(regression_probe, np.zeros((3, 1)), np.array([1.0, 2.0, 3.0]))["mae"] == 1.0


def test_importing_the_classical_probes_does_not_import_torch():
    code = (
        "import sys, voxelfm.probes.registry, voxelfm.stats.bootstrap, voxelfm.stats.efficiency;"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
