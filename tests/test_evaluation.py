"""Task config, per-task probe runs and the results report, on synthetic embeddings."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index
from scipy.stats import pearsonr
from sklearn.metrics import (
    average_precision_score,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
)

from voxelfm.errors import VoxelFMError
from voxelfm.evaluation import BootstrapSettings, EvaluationTask, aggregate, align_task, run_task
from voxelfm.evaluation.results import METRICS_FILE, PREDICTIONS_FILE, RANKS_FILE, TASK_FILE
from voxelfm.splits import PatientLeakageError

FAST_BOOTSTRAP = BootstrapSettings(n_boot=200, seed=0)


class FakeEmbeddings:
    """The reader interface run_task uses, over in-memory arrays."""

    def __init__(self, scan_ids, patient_ids, features, tokens=None, backbone="fake"):
        self.scan_ids = list(scan_ids)
        self.patient_ids = list(patient_ids)
        self._features = np.asarray(features, dtype=np.float32)
        self._tokens = tokens
        self.attrs = {"backbone": backbone}

    def global_features(self, kind="cls+pooled"):
        return self._features

    def pooled_patch_grid(self, scan_id, grid=(4, 4, 4)):
        if self._tokens is None:
            return None
        return self._tokens[self.scan_ids.index(scan_id)]


def make_cohort(n_patients=60, seed=0, signal=2.0, dim=8, repeat_every=3):
    """Scans (some patients scanned twice) whose features carry every label's signal."""
    rng = np.random.default_rng(seed)
    rows, features = [], []
    for p in range(n_patients):
        latent = rng.standard_normal(dim)
        split = ("train", "train", "train", "val", "test")[p % 5]
        for s in range(2 if p % repeat_every == 0 else 1):
            x = latent + 0.1 * rng.standard_normal(dim)
            risk = signal * latent[1]
            time = rng.exponential(np.exp(-risk)) + 0.01
            rows.append(
                {
                    "scan_id": f"p{p:03d}_s{s}",
                    "patient_id": f"p{p:03d}",
                    "finding": int(signal * latent[0] + rng.standard_normal() > 0),
                    "target": float(3 * latent[2] + 0.5 * rng.standard_normal()),
                    "survival_time": time,
                    "event": int(rng.random() < 0.8),
                    "split": split,
                }
            )
            features.append(x)
    return pd.DataFrame(rows), np.stack(features)


def embeddings_of(table, features, **kwargs):
    return FakeEmbeddings(table.scan_id, table.patient_id, features, **kwargs)


TASKS = {
    "finding": {"category": "classification", "labels": ["finding"], "probes": ["logistic", "knn"]},
    "volume": {"category": "regression", "labels": ["target"], "probes": ["ridge"]},
    "survival": {"category": "survival", "labels": ["survival_time", "event"], "probes": ["cox"]},
    "repeat": {"category": "retrieval", "probes": ["gallery", "pool"]},
}


def test_task_spec_rejects_bad_settings():
    with pytest.raises(VoxelFMError, match="category"):
        EvaluationTask.from_config("t", {"category": "segmentation?", "labels": ["x"]})
    with pytest.raises(VoxelFMError, match="2 label column"):
        EvaluationTask.from_config("t", {"category": "survival", "labels": ["time"]})
    with pytest.raises(VoxelFMError, match="unknown classification probe"):
        EvaluationTask.from_config(
            "t", {"category": "classification", "labels": ["y"], "probes": ["svm"]}
        )
    with pytest.raises(VoxelFMError, match="unknown setting"):
        EvaluationTask.from_config("t", {"category": "regression", "labels": ["y"], "typo": 1})
    spec = EvaluationTask.from_config("t", {"category": "survival", "labels": ["t", "e"]})
    assert spec.probes == ("cox", "mlp_cox")


def test_leakage_guard_fails_loudly():
    table, _ = make_cohort()
    repeated = table[table.patient_id.duplicated(keep=False)].patient_id.iloc[0]
    rows = table.index[table.patient_id == repeated]
    table.loc[rows[0], "split"], table.loc[rows[1], "split"] = "train", "test"
    task = EvaluationTask.from_config("finding", TASKS["finding"])
    with pytest.raises(PatientLeakageError, match=repeated):
        align_task(task, table, table.scan_id, table.patient_id)


def test_alignment_reports_dropped_scans_and_checks_patients():
    table, _ = make_cohort()
    task = EvaluationTask.from_config("volume", TASKS["volume"])
    table.loc[0, "target"] = np.nan
    embedded = table.iloc[:-1]  # the last scan has no embedding
    data = align_task(task, table, embedded.scan_id, embedded.patient_id)
    assert data.dropped == {
        table.scan_id.iloc[0]: "missing label value",
        table.scan_id.iloc[-1]: "no embedding (failed preprocessing or extraction)",
    }
    assert len(data.rows) == len(table) - 2
    wrong_patients = ["someone_else", *embedded.patient_id.iloc[1:]]
    with pytest.raises(VoxelFMError, match="patient"):
        align_task(task, table, embedded.scan_id, wrong_patients)


def _run(tmp_path, name, table, features, **kwargs):
    task = EvaluationTask.from_config(name, TASKS[name] | kwargs)
    out = run_task(
        embeddings_of(table, features), table, task, tmp_path / name, bootstrap=FAST_BOOTSTRAP
    )
    metrics = pd.read_csv(out / METRICS_FILE)
    predictions = pd.read_csv(out / PREDICTIONS_FILE)
    return out, metrics, predictions


def _estimate(metrics, probe, metric):
    row = metrics[(metrics.probe == probe) & (metrics.metric == metric)]
    assert len(row) == 1
    return row.iloc[0]


def test_classification_metrics_match_sklearn(tmp_path):
    table, features = make_cohort()
    _, metrics, predictions = _run(tmp_path, "finding", table, features)
    test = predictions[predictions.split == "test"]
    for probe in ("logistic", "knn"):
        y, scores = test.finding.to_numpy(), test[f"score:{probe}"].to_numpy()
        auroc = _estimate(metrics, probe, "auroc")
        assert auroc.estimate == pytest.approx(roc_auc_score(y, scores))
        assert auroc.ci_low <= auroc.estimate <= auroc.ci_high
        assert _estimate(metrics, probe, "auprc").estimate == pytest.approx(
            average_precision_score(y, scores)
        )
    assert _estimate(metrics, "logistic", "auroc").estimate > 0.65  # the signal is learnable


def test_regression_and_survival_metrics_match_independent_code(tmp_path):
    table, features = make_cohort()
    _, metrics, predictions = _run(tmp_path, "volume", table, features)
    test = predictions[predictions.split == "test"]
    y, predicted = test.target.to_numpy(), test["score:ridge"].to_numpy()
    assert _estimate(metrics, "ridge", "mae").estimate == pytest.approx(
        mean_absolute_error(y, predicted)
    )
    assert _estimate(metrics, "ridge", "r2").estimate == pytest.approx(r2_score(y, predicted))
    assert _estimate(metrics, "ridge", "pearson_r").estimate == pytest.approx(
        pearsonr(y, predicted).statistic
    )

    _, metrics, predictions = _run(tmp_path, "survival", table, features)
    test = predictions[predictions.split == "test"]
    c_index = concordance_index(test.survival_time, -test["score:cox"], test.event)
    assert _estimate(metrics, "cox", "c_index").estimate == pytest.approx(c_index)
    assert c_index > 0.6


def test_selection_never_sees_test_labels(tmp_path):
    """Scrambling every test label changes test metrics but nothing chosen on validation."""
    table, features = make_cohort()
    scrambled = table.copy()
    is_test = scrambled.split == "test"
    rng = np.random.default_rng(1)
    scrambled.loc[is_test, "finding"] = rng.integers(0, 2, is_test.sum())
    _, metrics_a, predictions_a = _run(tmp_path / "a", "finding", table, features)
    _, metrics_b, predictions_b = _run(tmp_path / "b", "finding", scrambled, features)
    for column in ("hyperparameters", "validation_score", "decision_threshold"):
        pd.testing.assert_series_equal(metrics_a[column], metrics_b[column])
    for probe in ("logistic", "knn"):
        np.testing.assert_array_equal(
            predictions_a[f"score:{probe}"], predictions_b[f"score:{probe}"]
        )
    assert not np.allclose(metrics_a.estimate, metrics_b.estimate)


def test_retrieval_of_repeat_scans(tmp_path):
    table, features = make_cohort()
    out, metrics, _ = _run(tmp_path, "repeat", table, features)
    # Repeat scans differ by 0.1 noise around a unit-variance latent: near-perfect retrieval.
    assert _estimate(metrics, "gallery", "recall@1").estimate > 0.9
    assert _estimate(metrics, "pool", "recall@1").estimate > 0.9
    ranks = pd.read_csv(out / RANKS_FILE)
    n_repeat_patients = table.patient_id.duplicated().sum()
    assert (ranks.protocol == "gallery").sum() == 2 * n_repeat_patients
    # Random features: recall@1 of the pool protocol sits near chance (1 / pool size).
    noise = np.random.default_rng(3).standard_normal(features.shape)
    _, metrics, _ = _run(tmp_path / "noise", "repeat", table, noise)
    assert _estimate(metrics, "pool", "recall@1").estimate < 0.25


def test_token_probe_skipped_without_patch_tokens(tmp_path):
    table, features = make_cohort(n_patients=30)
    out, metrics, _ = _run(tmp_path, "finding", table, features, probes=["attentive"])
    assert metrics.note.iloc[0].startswith("skipped")
    assert json.loads((out / TASK_FILE).read_text())["n_scans"]["test"] > 0


def test_efficiency_sweep_written(tmp_path):
    table, features = make_cohort()
    out, _, _ = _run(tmp_path, "finding", table, features, label_fractions=[0.25, 1.0])
    sweep = pd.read_csv(out / "efficiency.csv")
    assert sorted(sweep.n_train_patients.unique()) == [9, 36]
    assert set(sweep.metric) == {"auroc", "auprc", "balanced_accuracy"}


def test_aggregate_report(tmp_path):
    table, features = make_cohort()
    noise = np.random.default_rng(3).standard_normal(features.shape)
    results = {}
    for backbone, feats in (("good", features), ("noise", noise)):
        for name, settings in TASKS.items():
            task = EvaluationTask.from_config(name, settings)
            results[(name, backbone)] = run_task(
                embeddings_of(table, feats, backbone=backbone),
                table,
                task,
                tmp_path / name / backbone,
                bootstrap=FAST_BOOTSTRAP,
            )
    out = aggregate(results, tmp_path / "report", backbones=["good", "noise"])
    produced = {p.name for p in out.iterdir()}
    assert {"results.csv", "results.md", "paired.csv", "overview.png"} <= produced
    assert {"roc_finding.png", "km_survival.png", "retrieval_repeat.png"} <= produced
    paired = pd.read_csv(out / "paired.csv")
    r2 = paired[(paired.task == "volume") & (paired.metric == "r2")].iloc[0]
    assert r2.difference > 0.5 and r2.p_value < 0.05
    markdown = (out / "results.md").read_text()
    assert "| probe | metric | good | noise |" in markdown
    assert "## Paired differences against good" in markdown
    # The HTML page the Snakemake report shows holds the same tables and the comparisons.
    page = (out / "results.html").read_text()
    assert "<th>probe</th><th>metric</th><th>good</th><th>noise</th>" in page
    assert "<h2>Paired differences against good</h2>" in page
    assert page.count("<table>") == sum(line.startswith("|---") for line in markdown.splitlines())
    assert "*gallery* (every backbone): all other scans are the gallery" in markdown


def test_paired_self_comparison_is_zero(tmp_path):
    table, features = make_cohort()
    task = EvaluationTask.from_config("volume", TASKS["volume"])
    results = {
        ("volume", b): run_task(
            embeddings_of(table, features), table, task, tmp_path / b, bootstrap=FAST_BOOTSTRAP
        )
        for b in ("a", "b")
    }
    paired = pd.read_csv(
        aggregate(results, tmp_path / "report", backbones=["a", "b"]) / "paired.csv"
    )
    assert np.allclose(paired.difference, 0) and (paired.p_value == 1).all()


def test_label_table_from_a_cohort_folder(tmp_path):
    from voxelfm.errors import InputError
    from voxelfm.evaluation import read_label_table

    table, _ = make_cohort(n_patients=5)
    table.to_csv(tmp_path / "labels.csv", index=False)
    assert read_label_table(tmp_path).scan_id.tolist() == table.scan_id.tolist()
    table.drop(columns="patient_id").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match="patient_id"):
        read_label_table(tmp_path / "bad.csv")


def _metric_rows(values, metric="r2", category="regression", task="volume"):
    return pd.DataFrame(
        [
            {
                "task": task,
                "category": category,
                "probe": "ridge",
                "metric": metric,
                "backbone": backbone,
                "estimate": value,
                "ci_low": value - 0.05,
                "ci_high": value + 0.05,
                "note": "",
            }
            for backbone, value in values.items()
        ]
    )


def test_notes_say_which_backbone_they_belong_to():
    from voxelfm.evaluation.report_tables import _notes

    rows = _metric_rows({"a": 0.5, "b": 0.4, "c": 0.3})
    rows["note"] = ["baseline error 46.8 mm", "baseline error 52.1 mm", "baseline error 46.8 mm"]
    assert _notes(rows, ["a", "b", "c"]) == [
        "\n*ridge* (a, c): baseline error 46.8 mm",
        "\n*ridge* (b): baseline error 52.1 mm",
    ]
    rows["note"] = "same for all"
    assert _notes(rows, ["a", "b", "c"]) == ["\n*ridge* (every backbone): same for all"]


def test_overview_is_a_grid_with_off_scale_values_marked():
    from voxelfm.evaluation.report_figures import plot_overview

    tasks = [f"task{k}" for k in range(7)]
    metrics = pd.concat(
        [
            _metric_rows({"a": 0.6, "b": -200.0 if k == 1 else 0.3, "c": 0.4}, task=task)
            for k, task in enumerate(tasks)
        ]
    )
    figure = plot_overview(metrics, ["a", "b", "c"], tasks)
    panels = [axes for axes in figure.axes if axes.get_visible()]
    assert len(panels) == 7
    width, height = figure.get_size_inches() * 120  # the report's dpi
    assert width <= 1300 and height <= 1300  # three panels a row, not seven side by side
    bottom, top = panels[1].get_ylim()
    assert -1.2 < bottom < 0.3  # R^2 = -200 does not stretch the axis...
    assert 0.6 < top < 1.2  # ...and the other backbones' values stay in view
    assert any("-200" in text.get_text() for text in panels[1].texts)
    assert not any(axes.texts for k, axes in enumerate(panels) if k != 1)


def test_efficiency_axis_labels_are_plain_numbers():
    from voxelfm.stats.plots import plot_data_efficiency

    sweep = pd.DataFrame(
        {
            "n_train_patients": [9, 18, 36, 9, 18, 36],
            "metric": "auroc",
            "value": [0.6, 0.65, 0.7, 0.62, 0.66, 0.72],
        }
    )
    figure = plot_data_efficiency(sweep, "auroc")
    figure.canvas.draw()
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["9", "18", "36"]
    assert not any(t.get_text() for t in axes.xaxis.get_minorticklabels())
