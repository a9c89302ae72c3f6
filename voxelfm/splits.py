"""Patient-level splits: every scan of a patient lives in exactly one split.

Scans of the same patient are strongly correlated (same anatomy, often the same scanner), so a
patient in both train and test inflates every metric. Splits are therefore drawn over patients
and checked before any probe is fitted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from voxelfm.errors import VoxelFMError

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")

# Enough to identify the problem without flooding a one-line error message.
_MAX_PATIENTS_NAMED = 5


class PatientLeakageError(VoxelFMError):
    """A patient has scans in more than one split."""


def check_patient_level_split(patient_ids: Sequence, split: Sequence) -> None:
    """Raise ``PatientLeakageError`` naming the patients that appear in two or more splits.

    Args:
        patient_ids: (n_scans,) patient identifier of each scan.
        split: (n_scans,) split name of each scan (any hashable labels, e.g. train/val/test).
    """
    if len(patient_ids) != len(split):
        raise VoxelFMError(
            f"patient_ids ({len(patient_ids)}) and split ({len(split)}) differ in length"
        )
    table = pd.DataFrame({"patient": np.asarray(patient_ids), "split": np.asarray(split)})
    splits_per_patient = table.groupby("patient")["split"].unique()
    leaking = splits_per_patient[splits_per_patient.map(len) > 1]
    if leaking.empty:
        return
    named = "; ".join(
        f"{patient} in {', '.join(sorted(map(str, splits)))}"
        for patient, splits in leaking.head(_MAX_PATIENTS_NAMED).items()
    )
    more = len(leaking) - _MAX_PATIENTS_NAMED
    suffix = f" (and {more} more)" if more > 0 else ""
    raise PatientLeakageError(
        f"{len(leaking)} patient(s) have scans in more than one split: {named}{suffix}"
    )


def patient_strata(patient_ids: Sequence, labels: Sequence) -> pd.Series:
    """The stratum of each patient: the most frequent label over its scans (ties: smallest).

    Returns a Series indexed by the sorted unique patient ids.
    """
    table = pd.DataFrame({"patient": np.asarray(patient_ids), "label": np.asarray(labels)})
    return table.groupby("patient")["label"].agg(lambda values: values.mode().min())


def make_patient_split(
    patient_ids: Sequence,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    stratify: Sequence | None = None,
) -> np.ndarray:
    """Assign every scan to train / val / test by drawing patients, deterministically.

    The result depends only on the set of patients (sorted), the fractions and the seed, not on
    the order of the rows, so re-exporting a manifest in another order gives the same split.

    Args:
        patient_ids: (n_scans,) patient identifier of each scan.
        fractions: train, val and test fractions of patients; must sum to 1.
        seed: random seed.
        stratify: optional (n_scans,) label per scan; patients are stratified by their most
            frequent label so each split keeps the class balance (e.g. the event indicator
            for survival).

    Returns:
        (n_scans,) array of "train" / "val" / "test".
    """
    if len(fractions) != 3 or min(fractions) <= 0 or not np.isclose(sum(fractions), 1.0):
        raise VoxelFMError(
            f"split fractions must be three positive numbers summing to 1: {fractions}"
        )
    train_fraction, val_fraction, test_fraction = fractions
    if stratify is None:
        patients = pd.Index(np.unique(np.asarray(patient_ids)))
        strata = None
    else:
        by_patient = patient_strata(patient_ids, stratify)
        patients, strata = by_patient.index, by_patient.to_numpy()
    try:
        rest, test, rest_strata, _ = _split_with_strata(patients, strata, test_fraction, seed)
        train, val, _, _ = _split_with_strata(
            rest, rest_strata, val_fraction / (train_fraction + val_fraction), seed
        )
    except ValueError as error:  # sklearn: too few patients, or a stratum too small to split
        raise VoxelFMError(
            f"cannot split {len(patients)} patients by {fractions}: {error}"
        ) from None
    split_of_patient = {
        **dict.fromkeys(train, "train"),
        **dict.fromkeys(val, "val"),
        **dict.fromkeys(test, "test"),
    }
    return np.array([split_of_patient[p] for p in np.asarray(patient_ids)], dtype=object)


def _split_with_strata(items, strata, second_fraction: float, seed: int):
    """``train_test_split`` that also carries the strata of both halves (None if unstratified)."""
    # Imported here: this base-layer module is read at Snakefile parse time, sklearn is not needed there.
    from sklearn.model_selection import train_test_split

    if strata is None:
        first, second = train_test_split(
            np.asarray(items), test_size=second_fraction, random_state=seed
        )
        return first, second, None, None
    return train_test_split(
        np.asarray(items), strata, test_size=second_fraction, random_state=seed, stratify=strata
    )


def subsample_patients(
    patient_ids: Sequence,
    n_patients: int,
    seed: int,
    stratify: Sequence | None = None,
) -> np.ndarray:
    """Row indices of all scans of ``n_patients`` randomly drawn patients (sorted).

    With ``stratify`` the draw first takes one random patient of every stratum, then the rest
    uniformly from the remaining patients, so a small labelled subset never loses a class
    (sklearn's stratified split does not guarantee that for tiny draws) and keeps the class
    balance in expectation.

    Returns:
        (n_selected_scans,) int indices into ``patient_ids``.
    """
    patient_ids = np.asarray(patient_ids)
    rng = np.random.default_rng(seed)
    if stratify is None:
        patients = np.unique(patient_ids)
        one_per_stratum = patients[:0]
    else:
        by_patient = patient_strata(patient_ids, stratify)
        patients, strata = by_patient.index.to_numpy(), by_patient.to_numpy()
        one_per_stratum = np.array(
            [rng.choice(patients[strata == s]) for s in np.unique(strata)], dtype=patients.dtype
        )
    if not max(1, len(one_per_stratum)) <= n_patients <= len(patients):
        raise VoxelFMError(
            f"cannot draw {n_patients} of {len(patients)} patients"
            + (f" covering all {len(one_per_stratum)} strata" if len(one_per_stratum) else "")
        )
    remaining = np.setdiff1d(patients, one_per_stratum)
    rest = rng.choice(remaining, size=n_patients - len(one_per_stratum), replace=False)
    chosen = np.concatenate([one_per_stratum, rest])
    return np.flatnonzero(np.isin(patient_ids, chosen))
