"""Rule-based findings: synthetic reports, hand-written reports with negations, F1 metrics."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from voxelfm.evaluation.findings import (
    FINDING_NAMES,
    extract_findings,
    finding_scores,
    finding_status,
    findings_matrix,
)
from voxelfm.synth.report import write_report

LOBES = ["right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe"]
SEGMENTS = ["segment II", "segment IVa", "segment VI", "segment VIII"]


def _lesion(kind: str, location: str, diameter: float):
    return SimpleNamespace(
        lesion=SimpleNamespace(kind=kind, location=location), diameter_mm=diameter
    )


def test_synthetic_reports_give_back_their_findings():
    """Every wording of the synthetic generator, with and without each finding."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_nodules, n_lesions = rng.integers(0, 3), rng.integers(0, 3)
        lesions = [
            _lesion("lung_nodule", LOBES[rng.integers(4)], rng.uniform(4, 30))
            for _ in range(n_nodules)
        ] + [
            _lesion("liver_lesion", SEGMENTS[rng.integers(4)], rng.uniform(5, 40))
            for _ in range(n_lesions)
        ]
        liver_hu = rng.choice([20.0, 60.0])
        volume = rng.choice([1500.0, 2600.0])
        report = write_report(rng, lesions, liver_hu=liver_hu, liver_volume_ml=volume)
        expected = {
            name
            for name, present in [
                ("Lung nodule", n_nodules > 0),
                ("Liver lesion", n_lesions > 0),
                ("Hepatic steatosis", liver_hu < 40),
                ("Hepatomegaly", volume > 2200),
            ]
            if present
        }
        assert extract_findings(report) == expected, report


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ("No pulmonary nodule.", set()),
        ("The liver is without focal lesion.", set()),
        ("The lungs are clear. Unremarkable liver. Normal study.", set()),
        ("The liver is not enlarged. No evidence of hepatic steatosis.", set()),
        ("No pleural effusion, consolidation or nodule; mild cardiomegaly.", {"Cardiomegaly"}),
        ("No effusion but a small nodule in the right upper lobe.", {"Lung nodule"}),
        ("Pleural effusion has resolved. Emphysema.", {"Emphysema"}),
        ("No change in the 5 mm nodule.", {"Lung nodule"}),
        ("A 4 mm nodule, not calcified.", {"Lung nodule"}),
        ("Thyroid nodule. Hypodense lesion in hepatic segment VI.", {"Liver lesion"}),
        (
            "Coronary artery calcification and aortic atherosclerosis. Small hiatal hernia.",
            {"Coronary artery wall calcification", "Arterial wall calcification", "Hiatal hernia"},
        ),
        (
            "Bibasal atelectasis and ground-glass opacities. Pericardial effusion.",
            {"Atelectasis", "Lung opacity", "Pericardial effusion"},
        ),
        (
            "Pacemaker in situ. Enlarged mediastinal lymph nodes.",
            {"Medical material", "Lymphadenopathy"},
        ),
        (
            (
                "Bronchiectasis with peribronchial thickening, mosaic attenuation and interlobular "
                "septal thickening. Fibrotic sequelae."
            ),
            {
                "Bronchiectasis",
                "Peribronchial thickening",
                "Mosaic attenuation pattern",
                "Interlobular septal thickening",
                "Pulmonary fibrotic sequela",
            },
        ),
    ],
)
def test_hand_written_reports(report, expected):
    assert extract_findings(report) == expected


def test_negated_mentions_are_remembered_as_negative():
    status = finding_status("No pulmonary nodule. Fatty liver.")
    assert status == {"Lung nodule": False, "Hepatic steatosis": True}


def test_vocabulary_covers_the_ct_rate_labels():
    assert len(FINDING_NAMES) == 21  # 18 CT-RATE labels + 3 synthetic-only findings
    matrix = findings_matrix(["Cardiomegaly.", "No cardiomegaly.", ""])
    assert matrix.shape == (3, 21)
    assert matrix[:, FINDING_NAMES.index("Cardiomegaly")].tolist() == [1, 0, 0]


def test_finding_scores_by_hand():
    reference = np.array([[1, 0, 0], [1, 1, 0]])
    generated = np.array([[1, 1, 0], [0, 1, 0]])
    scores = finding_scores(reference, generated)
    # tp 2 (one per finding), fp 1, fn 1; column 3 has no positive and is left out of the macro.
    assert scores.precision == pytest.approx(2 / 3)
    assert scores.recall == pytest.approx(2 / 3)
    assert scores.f1 == pytest.approx(2 / 3)
    assert scores.f1_macro == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_finding_scores_match_sklearn():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 2, (40, 6))
    generated = np.where(rng.random((40, 6)) < 0.7, reference, 1 - reference)
    scores = finding_scores(reference, generated)
    p, r, f, _ = precision_recall_fscore_support(reference, generated, average="micro")
    assert (scores.precision, scores.recall, scores.f1) == pytest.approx((p, r, f))
    assert scores.f1_macro == pytest.approx(f1_score(reference, generated, average="macro"))
    # With nothing generated, precision and F1 are 0, not undefined.
    empty = finding_scores(reference, np.zeros_like(reference))
    assert (empty.precision, empty.recall, empty.f1) == (0.0, 0.0, 0.0)
