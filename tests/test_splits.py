"""Patient-level splitting and the leakage guard."""

from __future__ import annotations

import numpy as np
import pytest

from voxelfm.errors import VoxelFMError
from voxelfm.splits import (
    PatientLeakageError,
    check_patient_level_split,
    make_patient_split,
    subsample_patients,
)


def _patients_with_repeat_scans(n_patients: int = 50) -> np.ndarray:
    """Patient ids, every third patient with two scans, rows shuffled."""
    ids = [f"p{i:03d}" for i in range(n_patients) for _ in range(2 if i % 3 == 0 else 1)]
    return np.random.default_rng(1).permutation(np.array(ids))


def test_leakage_guard_names_the_patient_in_two_splits():
    patients = ["a", "a", "b", "c", "c"]
    split = ["train", "test", "train", "val", "val"]
    with pytest.raises(PatientLeakageError, match=r"1 patient\(s\).*a in test, train"):
        check_patient_level_split(patients, split)
    assert issubclass(PatientLeakageError, VoxelFMError)


def test_leakage_guard_accepts_a_clean_split_and_caps_the_message():
    check_patient_level_split(["a", "a", "b"], ["train", "train", "test"])
    many = [f"p{i}" for i in range(8)] * 2
    with pytest.raises(PatientLeakageError, match=r"8 patient\(s\).*\(and 3 more\)"):
        check_patient_level_split(many, ["train"] * 8 + ["test"] * 8)


def test_patient_split_is_patient_level_deterministic_and_order_free():
    patients = _patients_with_repeat_scans()
    split = make_patient_split(patients, (0.6, 0.2, 0.2), seed=3)
    check_patient_level_split(patients, split)
    np.testing.assert_array_equal(split, make_patient_split(patients, (0.6, 0.2, 0.2), seed=3))
    # Same patients in another row order -> every patient keeps its split.
    order = np.random.default_rng(0).permutation(len(patients))
    reordered = make_patient_split(patients[order], (0.6, 0.2, 0.2), seed=3)
    np.testing.assert_array_equal(reordered, split[order])
    n_test_patients = len(np.unique(patients[split == "test"]))
    assert n_test_patients == 10  # 20% of 50 patients
    assert not np.array_equal(split, make_patient_split(patients, seed=4))


def test_stratified_split_keeps_the_class_balance():
    patients = np.arange(100)
    labels = (patients < 20).astype(int)  # 20% positive
    split = make_patient_split(patients, (0.6, 0.2, 0.2), seed=0, stratify=labels)
    for name in ("train", "val", "test"):
        assert labels[split == name].mean() == pytest.approx(0.2)


def test_split_reports_impossible_requests():
    with pytest.raises(VoxelFMError, match="sum"):
        make_patient_split(["a", "b"], (0.5, 0.5, 0.5))
    with pytest.raises(VoxelFMError, match="cannot split"):
        make_patient_split(["a", "b", "c", "d", "e"], stratify=[0, 0, 0, 0, 1])


def test_subsample_takes_whole_patients_and_keeps_every_stratum():
    patients = _patients_with_repeat_scans()
    rows = subsample_patients(patients, 7, seed=0)
    chosen = set(patients[rows])
    assert len(chosen) == 7
    # all scans of each chosen patient are included
    assert set(np.flatnonzero(np.isin(patients, list(chosen)))) == set(rows)
    labels = np.array([int(p == "p049") for p in patients])  # one positive patient of 50
    for seed in range(5):
        assert labels[subsample_patients(patients, 2, seed, stratify=labels)].sum() == 1
    with pytest.raises(VoxelFMError, match="strata"):
        subsample_patients(patients, 1, 0, stratify=labels)
