"""Patient-level bootstrap: coverage, grouping, undefined resamples, paired comparisons."""

from __future__ import annotations

import numpy as np
import pytest

from voxelfm.probes.classification import auroc
from voxelfm.probes.regression import mean_absolute_error_metric
from voxelfm.stats.bootstrap import (
    PatientResamples,
    bootstrap_grouped_means,
    bootstrap_metrics,
    paired_bootstrap,
)


def test_interval_covers_the_true_value_about_95_percent_of_the_time():
    """Errors ~ N(0, 1): the true mean absolute error is sqrt(2 / pi)."""
    true_mae = np.sqrt(2 / np.pi)
    mae = lambda y, predictions: np.abs(y - predictions).mean()  # bare numpy: 40k calls
    rng = np.random.default_rng(0)
    n_simulations, covered = 200, 0
    for simulation in range(n_simulations):
        y = rng.normal(size=80)
        predictions = y + rng.normal(size=80)
        result = bootstrap_metrics(
            {"mae": mae}, y, predictions, np.arange(80), n_boot=200, seed=simulation
        )["mae"]
        covered += result.lower <= true_mae <= result.upper
    assert 0.88 <= covered / n_simulations <= 0.99


def test_resampling_draws_all_scans_of_a_patient_together():
    patients = np.array(["p0", "p1", "p1", "p2", "p3", "p3", "p3"])
    resamples = PatientResamples(patients, n_boot=300, seed=0)
    counts = resamples.patient_counts()  # (300, 4)
    for b in range(300):
        rows = resamples.rows(b)
        drawn = np.bincount(rows, minlength=len(patients))
        # p1's two scans and p3's three scans always appear equally often...
        assert drawn[1] == drawn[2] and drawn[4] == drawn[5] == drawn[6]
        # ...as often as the patient was drawn, and each resample has as many patients as the set.
        np.testing.assert_array_equal(drawn[[0, 1, 3, 4]], counts[b])
        assert counts[b].sum() == 4


def test_resamples_where_the_metric_is_undefined_are_counted_not_used():
    # One positive patient (two scans) among 15: resamples missing it have no AUROC.
    patients = np.repeat(np.arange(15), 2)
    y = (patients == 0).astype(int)
    scores = np.random.default_rng(0).random(30)
    result = bootstrap_metrics({"auroc": auroc}, y, scores, patients, n_boot=400, seed=1)["auroc"]
    drew_positive = (PatientResamples(patients, 400, seed=1).draws == 0).any(axis=1)
    assert result.n_boot_valid == drew_positive.sum() < 400
    assert result.estimate == pytest.approx(auroc(y, scores))
    assert result.lower <= result.upper


def test_paired_bootstrap_separates_a_better_predictor_from_an_identical_one():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(100), 2)
    y = np.repeat(rng.integers(0, 2, 100), 2)
    good = y + 0.5 * rng.normal(size=200)
    poor = y + 3.0 * rng.normal(size=200)
    better = paired_bootstrap({"auroc": auroc}, y, good, poor, patients, n_boot=300)["auroc"]
    assert better.difference == pytest.approx(auroc(y, good) - auroc(y, poor))
    assert better.p_value < 0.01 and better.lower > 0
    same = paired_bootstrap({"auroc": auroc}, y, good, good.copy(), patients, n_boot=100)["auroc"]
    assert same.p_value == 1.0 and same.lower == same.upper == 0.0


def test_paired_p_value_is_the_two_sided_proportion_beyond_zero():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 60)
    a, b = y + rng.normal(size=60), y + 1.3 * rng.normal(size=60)
    result = paired_bootstrap({"auroc": auroc}, y, a, b, np.arange(60), n_boot=150, seed=2)["auroc"]
    resamples = PatientResamples(np.arange(60), 150, seed=2)
    differences = np.array(
        [auroc(y[r], a[r]) - auroc(y[r], b[r]) for r in map(resamples.rows, range(150))]
    )
    beyond = min((differences <= 0).sum(), (differences >= 0).sum())
    assert 0 < beyond < 75  # a non-trivial case for the formula
    assert result.p_value == pytest.approx(min(1, 2 * (beyond + 1) / 151))
    assert (result.lower, result.upper) == pytest.approx(
        tuple(np.quantile(differences, [0.025, 0.975]))
    )


def test_grouped_means_equal_the_row_level_bootstrap():
    """Vectorised per-patient sums give the same resampled means as slicing rows."""
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(40), rng.integers(1, 5, 40))
    hits = rng.random(len(patients)) < 0.3
    result = bootstrap_grouped_means({"recall@1": hits}, patients, n_boot=200, seed=3)["recall@1"]
    resamples = PatientResamples(patients, 200, seed=3)
    means = [hits[resamples.rows(b)].mean() for b in range(200)]
    assert (result.lower, result.upper) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert result.estimate == hits.mean() and result.n_boot_valid == 200


def test_same_seed_same_interval():
    y = np.arange(20.0)
    first = bootstrap_metrics(
        {"mae": mean_absolute_error_metric}, y, y + 1, np.arange(20), n_boot=50, seed=9
    )
    again = bootstrap_metrics(
        {"mae": mean_absolute_error_metric}, y, y + 1, np.arange(20), n_boot=50, seed=9
    )
    assert first == again
