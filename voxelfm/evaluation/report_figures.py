"""The report's figures: the overview of every task, and per task its test curves.

* ``overview.png``: the primary metric of each task's first probe per backbone
  (:func:`plot_overview`);
* ``<prefix>_<task>.png``: the curves of a task's test predictions, for the categories in
  :data:`CATEGORY_FIGURES` (ROC, Kaplan-Meier, recall@k);
* ``efficiency_<task>.png``: the label-efficiency curves (:func:`plot_efficiency`).

Built on ``matplotlib.figure.Figure`` like ``voxelfm.stats.plots`` (which holds the figures
that do not read a report's folders), so no pyplot state is touched. This module imports
matplotlib: ``voxelfm.evaluation`` imports the report only when ``aggregate`` is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from voxelfm.evaluation.report_inputs import read_test_predictions, scored_probes, task_labels
from voxelfm.evaluation.results import PREDICTIONS_FILE, RANKS_FILE, score_matrix

# The metric shown in the overview figure and the efficiency curves, per category.
PRIMARY_METRIC = {
    "classification": "auroc",
    "regression": "r2",
    "survival": "c_index",
    "retrieval": "recall@1",
    "localisation": "mean_error_mm",
    "segmentation": "dice_macro",
    "report_generation": "finding_f1",
}
# Metrics where a lower value is better (the overview says so in its axis label).
LOWER_IS_BETTER = frozenset({"mae", "rmse", "mean_error_mm", "median_error_mm"})
# The range a metric can sensibly take on the overview's axis. Values outside (an R^2 of -200
# from a probe that failed on one backbone) are drawn at the edge as a marked arrow with the
# value written beside it, so one failure does not flatten every other panel's differences.
METRIC_AXIS_RANGE = {
    "auroc": (0.0, 1.0),
    "auprc": (0.0, 1.0),
    "balanced_accuracy": (0.0, 1.0),
    "c_index": (0.0, 1.0),
    "recall@1": (0.0, 1.0),
    "dice_macro": (0.0, 1.0),
    "finding_f1": (0.0, 1.0),
    "r2": (-1.0, 1.0),
    "pearson_r": (-1.0, 1.0),
}
OVERVIEW_COLUMNS = 3  # panels per row: readable at page width
FIGURE_DPI = 120


def save_figure(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=FIGURE_DPI)


def overview_limits(
    metric: str, estimate: np.ndarray, low: np.ndarray, high: np.ndarray
) -> tuple[float, float]:
    """Axis limits of one overview panel: the estimates and intervals, padded, but never past
    the metric's sensible range (errors: not past 3x the median estimate)."""
    values = np.concatenate([estimate, low, high])
    values = values[np.isfinite(values)]
    if not len(values):
        return (0.0, 1.0)
    floor, ceiling = METRIC_AXIS_RANGE.get(metric, (None, None))
    if floor is None:  # an unbounded error in mm or units: robust to one huge value
        finite = estimate[np.isfinite(estimate)]
        typical = float(np.median(np.abs(finite))) if len(finite) else float(np.max(values))
        floor, ceiling = min(0.0, float(values.min())), 3.0 * typical if typical > 0 else None
    lo = max(float(values.min()), floor)
    hi = float(values.max()) if ceiling is None else min(float(values.max()), ceiling)
    pad = 0.08 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1.0)
    return lo - pad, hi + pad


def plot_overview(metrics: pd.DataFrame, backbones: Sequence[str], tasks: Sequence[str]) -> Figure:
    """Primary metric of each task's first probe, per backbone, with 95% intervals; a grid of
    OVERVIEW_COLUMNS panels per row, off-scale values marked at the axis edge."""
    n = max(1, len(tasks))
    columns = min(OVERVIEW_COLUMNS, n)
    rows_of_panels = -(-n // columns)
    figure = Figure(figsize=(3.4 * columns, 3.2 * rows_of_panels), layout="constrained")
    grid = figure.subplots(rows_of_panels, columns, squeeze=False)
    for axes in grid.flat[len(tasks) :]:
        axes.set_visible(False)
    for axes, task in zip(grid.flat, tasks):
        rows = metrics[metrics["task"] == task]
        category = rows["category"].iloc[0]
        metric = PRIMARY_METRIC[category]
        first_probe = rows["probe"].iloc[0]
        if metric not in set(rows["metric"]):  # e.g. a runner that names its metrics otherwise
            metric = rows["metric"].dropna().iloc[0] if rows["metric"].notna().any() else metric
        selected = rows[(rows["probe"] == first_probe) & (rows["metric"] == metric)]
        selected = selected.set_index("backbone").reindex(backbones)
        x = np.arange(len(backbones))
        estimate = selected["estimate"].to_numpy(dtype=float)
        ci_low = selected["ci_low"].to_numpy(dtype=float)
        ci_high = selected["ci_high"].to_numpy(dtype=float)
        bottom, top = overview_limits(metric, estimate, ci_low, ci_high)
        inside = (estimate >= bottom) & (estimate <= top)
        axes.errorbar(
            x[inside],
            estimate[inside],
            yerr=[(estimate - ci_low)[inside], (ci_high - estimate)[inside]],
            fmt="o",
            capsize=4,
        )
        for position, value in zip(x[~inside], estimate[~inside]):
            if not np.isfinite(value):
                continue
            edge, marker, align = (bottom, "v", "bottom") if value < bottom else (top, "^", "top")
            axes.plot(position, edge, marker=marker, color="tab:red", markersize=9, clip_on=False)
            last = position == x[-1]  # the rightmost label goes left, inside the panel
            axes.annotate(
                f"{value:.3g}\n(off scale)",
                (position, edge),
                xytext=(-6 if last else 6, 0),
                textcoords="offset points",
                ha="right" if last else "left",
                va=align,
                fontsize=7,
                color="tab:red",
            )
        axes.set_ylim(bottom, top)
        axes.set_xlim(-0.5, len(backbones) - 0.5)
        axes.set_xticks(x, backbones, rotation=30, ha="right", fontsize=8)
        axes.set_title(f"{task} ({first_probe})", fontsize=9)
        axes.set_ylabel(f"{metric} (lower is better)" if metric in LOWER_IS_BETTER else metric)
        chance = {"auroc": 0.5, "c_index": 0.5, "r2": 0.0}.get(metric)
        if chance is not None and bottom <= chance <= top:
            axes.axhline(chance, color="grey", linestyle=":", linewidth=1)
    return figure


def _first_probe(predictions: pd.DataFrame) -> str | None:
    return next(iter(scored_probes(predictions)), None)


def plot_roc_curves(per_backbone: Mapping[str, Path], task: str) -> Figure | None:
    """Test ROC curve of the first probe of a binary task, one line per backbone."""
    # Heavy imports (sklearn here) wait until their figure is drawn.
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = Figure(figsize=(4.5, 4.2), layout="constrained")
    axes = figure.add_subplot()
    drawn = False
    for backbone, path in per_backbone.items():
        predictions = read_test_predictions(path)
        labels = task_labels(path)
        probe = _first_probe(predictions)
        if probe is None or len(labels) != 1 or f"score:{probe}" not in predictions:
            continue  # multi-class or multi-label: no single ROC curve
        y = predictions[labels[0]].to_numpy()
        scores = predictions[f"score:{probe}"].to_numpy()
        if len(np.unique(y)) != 2:
            continue
        fpr, tpr, _ = roc_curve(y, scores)
        axes.plot(fpr, tpr, label=f"{backbone} (AUROC {roc_auc_score(y, scores):.2f})")
        drawn = True
    if not drawn:
        return None
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{task}: ROC (test)")
    axes.legend(loc="lower right", fontsize=8)
    return figure


def plot_kaplan_meier(per_backbone: Mapping[str, Path], task: str) -> Figure | None:
    """Kaplan-Meier curves of test risk groups (split at the training median), per backbone."""
    # lifelines and sklearn (probes.survival; stats.plots imports it too): only when drawn.
    from voxelfm.probes.survival import kaplan_meier_risk_groups
    from voxelfm.stats.plots import draw_risk_groups

    figure = Figure(figsize=(3.6 * len(per_backbone), 3.4), layout="constrained")
    axes_row = figure.subplots(1, len(per_backbone), squeeze=False)[0]
    for axes, (backbone, path) in zip(axes_row, per_backbone.items()):
        predictions = pd.read_csv(path / PREDICTIONS_FILE)
        probe = _first_probe(predictions)
        if probe is None:
            axes.set_title(f"{backbone}: no probe")
            continue
        train, test = predictions["split"] == "train", predictions["split"] == "test"
        risk = score_matrix(predictions, probe)
        groups = kaplan_meier_risk_groups(
            risk[train], risk[test], predictions.loc[test, task_labels(path)].to_numpy(float)
        )
        draw_risk_groups(
            axes, groups, f"{backbone} ({probe}): log-rank p = {groups.logrank_p_value:.2g}"
        )
    axes_row[0].set_ylabel("survival probability")
    return figure


def plot_retrieval_recall(per_backbone: Mapping[str, Path], task: str) -> Figure | None:
    """Recall@k against k for each protocol and backbone, with the chance line."""
    frames = {b: pd.read_csv(p / RANKS_FILE) for b, p in per_backbone.items()}
    protocols = list(dict.fromkeys(p for f in frames.values() for p in f["protocol"]))
    figure = Figure(figsize=(4.2 * len(protocols), 3.6), layout="constrained")
    axes_row = figure.subplots(1, len(protocols), squeeze=False)[0]
    for axes, protocol in zip(axes_row, protocols):
        max_k = 1
        for backbone, frame in frames.items():
            ranks = frame.loc[frame["protocol"] == protocol, "rank"].to_numpy()
            pool = int(frame.loc[frame["protocol"] == protocol, "pool_size"].iloc[0])
            max_k = min(pool, 20)
            ks = np.arange(1, max_k + 1)
            axes.plot(ks, [(ranks <= k).mean() for k in ks], marker=".", label=backbone)
        if protocol == "pool":
            ks = np.arange(1, max_k + 1)
            axes.plot(ks, ks / pool, color="grey", linestyle=":", label="chance")
        axes.set(xlabel="k", ylabel="recall@k", ylim=(0, 1.02), title=f"{task}: {protocol}")
        axes.legend(fontsize=8)
    return figure


def plot_efficiency(efficiency: pd.DataFrame, metric: str, task: str) -> Figure:
    """Label-efficiency curves of one task, one line per backbone."""
    # stats.plots imports probes.survival (lifelines, sklearn): only when drawn.
    from voxelfm.stats.plots import plot_data_efficiency

    figure = plot_data_efficiency(efficiency, metric, group_column="backbone")
    figure.axes[0].set_title(f"{task}: {efficiency['probe'].iloc[0]} ({metric})")
    return figure


# Per category, the file-name prefix and the figure of a task's test predictions
# (``<prefix>_<task>.png``; the figure may return None when it has nothing to draw).
CATEGORY_FIGURES = {
    "classification": ("roc", plot_roc_curves),
    "survival": ("km", plot_kaplan_meier),
    "retrieval": ("retrieval", plot_retrieval_recall),
}
