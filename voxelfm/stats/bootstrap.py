"""Percentile bootstrap over test patients.

Scans of one patient are not independent, so the unit of resampling is the patient: a
resample draws patients with replacement and takes all scans of every drawn patient. A
resample on which a metric is undefined (the metric returns nan, e.g. AUROC with one class)
is skipped for that metric and counted, never silently replaced.

Every function draws the same resamples for the same (patients, n_boot, seed), so intervals
of different metrics, and the two arms of a paired comparison, share their resamples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from voxelfm.errors import VoxelFMError

MetricFn = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimate on all test rows and its percentile interval.

    ``n_boot_valid`` of the ``n_boot`` resamples gave a finite metric; the interval uses those.
    """

    estimate: float
    lower: float
    upper: float
    n_boot_valid: int
    n_boot: int


@dataclass(frozen=True)
class PairedBootstrapResult:
    """Difference ``estimate_a - estimate_b`` with its interval and two-sided p-value."""

    estimate_a: float
    estimate_b: float
    difference: float
    lower: float
    upper: float
    p_value: float
    n_boot_valid: int
    n_boot: int


class PatientResamples:
    """Bootstrap resamples of patients and the scan rows they select.

    Args:
        patient_ids: (n_rows,) patient of each test row.
        n_boot: number of resamples.
        seed: random seed.
    """

    def __init__(self, patient_ids: Sequence, n_boot: int = 1000, seed: int = 0):
        if n_boot < 1:
            raise VoxelFMError(f"n_boot must be positive, got {n_boot}")
        patients, self.patient_codes = np.unique(np.asarray(patient_ids), return_inverse=True)
        self.n_patients = len(patients)
        self.n_boot = n_boot
        # (n_boot, n_patients) codes of the drawn patients.
        self.draws = np.random.default_rng(seed).integers(
            0, self.n_patients, (n_boot, self.n_patients)
        )
        self._rows_by_patient = np.argsort(self.patient_codes, kind="stable")
        self._rows_per_patient = np.bincount(self.patient_codes, minlength=self.n_patients)
        self._first_row = np.cumsum(self._rows_per_patient) - self._rows_per_patient

    def rows(self, b: int) -> np.ndarray:
        """Row indices of resample ``b``: all rows of every drawn patient, repeats included."""
        drawn = self.draws[b]
        lengths = self._rows_per_patient[drawn]
        position_in_resample = np.cumsum(lengths) - lengths
        shift = np.repeat(self._first_row[drawn] - position_in_resample, lengths)
        return self._rows_by_patient[np.arange(lengths.sum()) + shift]

    def patient_counts(self) -> np.ndarray:
        """(n_boot, n_patients) how many times each patient is drawn in each resample."""
        flat = (self.draws + self.n_patients * np.arange(self.n_boot)[:, None]).ravel()
        return np.bincount(flat, minlength=self.n_boot * self.n_patients).reshape(
            self.n_boot, self.n_patients
        )


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    lower, upper = np.quantile(values, [tail, 1 - tail])
    return float(lower), float(upper)


def _resampled_metric(metric: MetricFn, y_true, scores, resamples: PatientResamples) -> np.ndarray:
    """(n_boot,) metric on every resample; nan where undefined."""
    return np.array(
        [
            metric(y_true[rows], scores[rows])
            for rows in map(resamples.rows, range(resamples.n_boot))
        ],
        dtype=np.float64,
    )


def bootstrap_metrics(
    metrics: Mapping[str, MetricFn],
    y_true: np.ndarray,
    scores: np.ndarray,
    patient_ids: Sequence,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, BootstrapResult]:
    """Percentile bootstrap interval of each metric, resampling test patients.

    Args:
        metrics: name -> ``(y_true, scores) -> float`` (nan when undefined).
        y_true: (n, ...) targets of the test rows.
        scores: (n, ...) probe scores of the same rows.
        patient_ids: (n,) patient of each row.
    """
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    resamples = PatientResamples(patient_ids, n_boot, seed)
    results = {}
    for name, metric in metrics.items():
        values = _resampled_metric(metric, y_true, scores, resamples)
        valid = values[np.isfinite(values)]
        results[name] = BootstrapResult(
            float(metric(y_true, scores)),
            *_percentile_interval(valid, confidence),
            len(valid),
            n_boot,
        )
    return results


def paired_bootstrap(
    metrics: Mapping[str, MetricFn],
    y_true: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    patient_ids: Sequence,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, PairedBootstrapResult]:
    """Compare two probes (e.g. two backbones) scored on the same test rows.

    Both arms are evaluated on the same resamples, so the patient-to-patient variation they
    share cancels in the difference. The two-sided p-value is twice the smaller proportion
    of resampled differences at or beyond zero on either side, with the +1 correction of
    Monte-Carlo tests (Davison & Hinkley 1997) so that it is never reported as exactly 0:
    ``min(1, 2 * (1 + min(#{d <= 0}, #{d >= 0})) / (n_valid + 1))``. It is the p-value that
    inverts the percentile interval: p < 1 - confidence about when the interval excludes 0.

    Args:
        scores_a, scores_b: (n, ...) scores of the two probes on the same rows as ``y_true``.
    """
    y_true, scores_a, scores_b = map(np.asarray, (y_true, scores_a, scores_b))
    if scores_a.shape != scores_b.shape or len(scores_a) != len(y_true):
        raise VoxelFMError(
            f"paired scores must cover the same rows: {scores_a.shape}, {scores_b.shape}, "
            f"{len(y_true)} targets"
        )
    resamples = PatientResamples(patient_ids, n_boot, seed)
    results = {}
    for name, metric in metrics.items():
        differences = _resampled_metric(metric, y_true, scores_a, resamples) - _resampled_metric(
            metric, y_true, scores_b, resamples
        )
        valid = differences[np.isfinite(differences)]
        beyond_zero = min((valid <= 0).sum(), (valid >= 0).sum())
        p_value = min(1.0, 2 * (1 + beyond_zero) / (len(valid) + 1))
        estimate_a, estimate_b = metric(y_true, scores_a), metric(y_true, scores_b)
        results[name] = PairedBootstrapResult(
            float(estimate_a),
            float(estimate_b),
            float(estimate_a - estimate_b),
            *_percentile_interval(valid, confidence),
            p_value=float(p_value),
            n_boot_valid=len(valid),
            n_boot=n_boot,
        )
    return results


def bootstrap_grouped_means(
    values: Mapping[str, np.ndarray],
    patient_ids: Sequence,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, BootstrapResult]:
    """Bootstrap of per-row means (e.g. retrieval hits per query) resampling patients.

    Vectorised: a resample's mean is ``counts @ per-patient sums / counts @ per-patient rows``
    with ``counts`` the (n_boot, n_patients) draw multiplicities.

    Args:
        values: name -> (n,) per-row values, e.g. ``rank <= k`` per retrieval trial.
        patient_ids: (n,) patient of each row (for retrieval, the query's patient).
    """
    resamples = PatientResamples(patient_ids, n_boot, seed)
    counts = resamples.patient_counts().astype(np.float64)  # (n_boot, n_patients)
    rows_per_patient = np.bincount(resamples.patient_codes, minlength=resamples.n_patients)
    results = {}
    for name, row_values in values.items():
        row_values = np.asarray(row_values, dtype=np.float64)
        sums = np.bincount(
            resamples.patient_codes, weights=row_values, minlength=resamples.n_patients
        )
        means = (counts @ sums) / (counts @ rows_per_patient)  # (n_boot,)
        results[name] = BootstrapResult(
            float(row_values.mean()), *_percentile_interval(means, confidence), n_boot, n_boot
        )
    return results
