"""The kNN panel of benchmarks/pretraining_knn_panel.py: out-of-fold scores never use the
scored patient, and the panel reports what the features carry."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pretraining_knn_panel.py"


@pytest.fixture(scope="module")
def panel():
    spec = importlib.util.spec_from_file_location("pretraining_knn_panel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _cohort(n_patients=60, scans_per_patient=2, seed=0):
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"p{i:03d}" for i in range(n_patients)], scans_per_patient)
    return rng, patients


def test_a_patient_is_never_scored_by_a_probe_that_saw_it(panel):
    # Features identify the patient and nothing else; labels are random per patient. Any
    # leakage of a patient's other scan into its probe would give AUROC near 1.
    rng, patients = _cohort()
    identity = {p: rng.normal(size=16) for p in np.unique(patients)}
    features = np.array([identity[p] + 0.01 * rng.normal(size=16) for p in patients])
    patient_label = {p: int(rng.random() < 0.5) for p in np.unique(patients)}
    labels = np.array([patient_label[p] for p in patients])
    scores = panel.out_of_fold_knn_scores(features, labels, patients)
    assert np.isfinite(scores).all()
    assert roc_auc_score(labels, scores) < 0.75


def test_informative_features_score_high_and_the_difference_is_paired(panel):
    rng, patients = _cohort()
    names = np.unique(patients)
    traits = pd.DataFrame(
        {trait: rng.normal(size=len(names)) for trait in panel.TRAITS}, index=names
    )
    traits.index.name = "patient_id"
    # "good" carries every trait of the scan's patient, "noise" carries none.
    good = np.array([traits.loc[p].to_numpy() for p in patients]) + 0.05 * rng.normal(
        size=(len(patients), len(panel.TRAITS))
    )
    noise = rng.normal(size=good.shape)
    table = panel.trait_panel({"good": good, "noise": noise}, traits, patients, n_boot=200)
    assert list(table["trait"]) == list(panel.TRAITS)
    assert (table["good"] > 0.75).all()
    assert abs(table["noise"].mean() - 0.5) < 0.1
    assert np.allclose(table["difference"], table["good"] - table["noise"])
    assert (table["lower"] > 0).all() and (table["lower"] <= table["difference"]).all()
