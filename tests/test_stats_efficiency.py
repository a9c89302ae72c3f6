"""Label-efficiency sweep (and that test data never reaches selection) and the figures."""

from __future__ import annotations

import numpy as np
import pytest

from voxelfm.probes.classification import fit_select_logistic
from voxelfm.probes.survival import kaplan_meier_risk_groups
from voxelfm.stats.efficiency import label_efficiency_sweep
from voxelfm.stats.plots import plot_data_efficiency, plot_risk_groups


def _cohort(seed=0):
    """60 training patients (every other one with two scans), 40 val rows, 40 test rows."""
    rng = np.random.default_rng(seed)
    train_patients = np.repeat(np.arange(60), np.where(np.arange(60) % 2 == 0, 2, 1))
    n = len(train_patients) + 80
    X = rng.normal(size=(n, 6))
    y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    t = len(train_patients)
    return (
        (X[:t], y[:t], train_patients),
        (X[t : t + 40], y[t : t + 40]),
        (X[t + 40 :], y[t + 40 :]),
    )


def _fast_logistic(X_train, y_train, X_val, y_val, *, seed):
    return fit_select_logistic(X_train, y_train, X_val, y_val, c_grid=(0.01, 1.0), seed=seed)


def test_sweep_returns_a_tidy_frame_of_whole_patient_subsamples():
    (X_tr, y_tr, patients), (X_va, y_va), (X_te, y_te) = _cohort()
    results = label_efficiency_sweep(
        _fast_logistic,
        X_tr,
        y_tr,
        patients,
        X_va,
        y_va,
        X_te,
        y_te,
        fractions=(0.1, 0.5, 1.0),
        n_repeats=2,
        stratify=y_tr,
    )
    assert sorted(results["n_train_patients"].unique()) == [6, 30, 60]
    assert len(results) == 3 * 2 * 3  # counts x repeats x metrics
    full = results[results["n_train_patients"] == 60]
    assert (full["n_train_scans"] == 90).all()  # all scans of all 60 patients
    assert results.groupby(["n_train_patients", "repeat"])["seed"].nunique().eq(1).all()
    assert results["seed"].nunique() == 6
    mean_auroc = results[results["metric"] == "auroc"].groupby("n_train_patients")["value"].mean()
    assert mean_auroc[60] > 0.8


def test_selection_never_receives_test_rows_and_ignores_test_labels():
    (X_tr, y_tr, patients), (X_va, y_va), (X_te, y_te) = _cohort()
    seen_rows = []

    def recording_fitter(X_train, y_train, X_val, y_val, *, seed):
        seen_rows.extend(map(bytes, np.concatenate([X_train, X_val])))
        return _fast_logistic(X_train, y_train, X_val, y_val, seed=seed)

    sweep = lambda y_test: label_efficiency_sweep(
        recording_fitter,
        X_tr,
        y_tr,
        patients,
        X_va,
        y_va,
        X_te,
        y_test,
        fractions=(0.2, 1.0),
        n_repeats=2,
        stratify=y_tr,
    )
    results = sweep(y_te)
    assert not set(seen_rows) & set(map(bytes, X_te))
    shuffled = sweep(np.random.default_rng(0).permutation(y_te))
    assert shuffled["hyperparameters"].tolist() == results["hyperparameters"].tolist()
    assert not np.allclose(shuffled["value"], results["value"])  # only the test metrics moved


def test_figures_render_headless(tmp_path):
    (X_tr, y_tr, patients), (X_va, y_va), (X_te, y_te) = _cohort()
    results = label_efficiency_sweep(
        _fast_logistic,
        X_tr,
        y_tr,
        patients,
        X_va,
        y_va,
        X_te,
        y_te,
        fractions=(0.2, 1.0),
        n_repeats=2,
        stratify=y_tr,
    )
    results["backbone"] = "voxelfm"
    figure = plot_data_efficiency(results, "auroc", group_column="backbone")
    line = figure.axes[0].lines[0]
    assert line.get_xdata().tolist() == [12, 60]
    expected = results[results["metric"] == "auroc"].groupby("n_train_patients")["value"].mean()
    assert line.get_ydata() == pytest.approx(expected.to_numpy())
    figure.savefig(tmp_path / "efficiency.png")

    rng = np.random.default_rng(0)
    y_survival = np.stack([rng.exponential(size=40) + 0.01, rng.integers(0, 2, 40)], axis=1)
    curves = kaplan_meier_risk_groups(rng.normal(size=40), rng.normal(size=40), y_survival)
    figure = plot_risk_groups(curves)
    assert "log-rank p" in figure.axes[0].get_title()
    figure.savefig(tmp_path / "km.png")
    assert (tmp_path / "km.png").stat().st_size > 0
