"""The study's results report: every (backbone, task) result side by side, with plots.

``aggregate`` reads the folders ``run_task`` wrote and writes into one folder:

* ``results.csv``: every metric of every probe, backbone and task with its 95% interval;
* ``results.md``: the same as Markdown tables (backbones as columns), followed by the paired
  comparisons; ``results.html`` the same page as HTML (shown in ``snakemake --report``);
* ``paired.csv``: paired bootstrap differences of each backbone against the reference
  backbone (the first listed), on the same test patients, with two-sided p-values;
* ``overview.png``, ``roc_<task>.png``, ``km_<task>.png``, ``retrieval_<task>.png``,
  ``efficiency_<task>.png``: the figures;
* ``<task>__<backbone>__<figure>.png``: the figures the dense probes drew per backbone
  (PCA feature maps, segmentation overlays, localisation markers).

Balanced accuracy is not paired: its threshold is chosen per backbone on validation, so the
two arms would not be scored by the same function.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from voxelfm.evaluation.results import (
    EFFICIENCY_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RANKS_FILE,
    TASK_FILE,
    BootstrapSettings,
    score_matrix,
)
from voxelfm.utils.atomic import atomic_directory

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
RESULTS_HTML = "results.html"  # the same tables, for the Snakemake report
PAIRED_CSV = "paired.csv"

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
FIGURES_DIR = "figures"
_PAIRED_METRICS = {
    "classification": ("auroc", "auprc"),
    "regression": ("mae", "r2", "pearson_r"),
    "survival": ("c_index",),
}


def aggregate(
    result_dirs: Mapping[tuple[str, str], str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    backbones: Sequence[str] | None = None,
    bootstrap: BootstrapSettings | None = None,
) -> Path:
    """Write the report folder from ``{(task, backbone): run_task folder}``; returns it.

    Args:
        backbones: display order; the first is the reference of the paired comparisons
            (default: sorted names).
    """
    bootstrap = bootstrap or BootstrapSettings()
    results = {key: Path(path) for key, path in result_dirs.items()}
    backbones = list(backbones or sorted({b for _, b in results}))
    tasks = list(dict.fromkeys(t for t, _ in results))
    metrics = pd.concat(
        [
            pd.read_csv(path / METRICS_FILE).assign(backbone=backbone)
            for (_, backbone), path in results.items()
        ],
        ignore_index=True,
    )
    categories = metrics.groupby("task")["category"].first().to_dict()
    paired = _paired_comparisons(results, tasks, backbones, categories, bootstrap)
    with atomic_directory(out_dir) as tmp:
        metrics.to_csv(tmp / RESULTS_CSV, index=False)
        paired.to_csv(tmp / PAIRED_CSV, index=False)
        markdown = results_markdown(metrics, paired, backbones, tasks, results)
        (tmp / RESULTS_MD).write_text(markdown)
        (tmp / RESULTS_HTML).write_text(markdown_to_html(markdown, title="Results"))
        _save(plot_overview(metrics, backbones, tasks), tmp / "overview.png")
        for task in tasks:
            category = categories[task]
            per_backbone = {b: results[(task, b)] for b in backbones if (task, b) in results}
            figure = {
                "classification": plot_roc_curves,
                "survival": plot_kaplan_meier,
                "retrieval": plot_retrieval_recall,
            }.get(category)
            if figure is not None:
                drawn = figure(per_backbone, task)
                if drawn is not None:
                    _save(drawn, tmp / f"{_figure_prefix(category)}_{task}.png")
            for backbone, path in per_backbone.items():
                for png in sorted((path / FIGURES_DIR).glob("*.png")):
                    shutil.copyfile(png, tmp / f"{task}__{backbone}__{png.name}")
            efficiency = _efficiency_table(per_backbone)
            if efficiency is not None:
                _save(
                    plot_efficiency(efficiency, PRIMARY_METRIC[category], task),
                    tmp / f"efficiency_{task}.png",
                )
    return Path(out_dir)


def _figure_prefix(category: str) -> str:
    return {"classification": "roc", "survival": "km", "retrieval": "retrieval"}[category]


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=120)


def _format_cell(row: pd.Series) -> str:
    if pd.isna(row["estimate"]):
        return str(row.get("note") or "n/a")
    if pd.isna(row.get("ci_low")) or pd.isna(row.get("ci_high")):
        return f"{row['estimate']:.3f}"
    return f"{row['estimate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def results_markdown(
    metrics: pd.DataFrame,
    paired: pd.DataFrame,
    backbones: Sequence[str],
    tasks: Sequence[str],
    results: Mapping[tuple[str, str], Path],
) -> str:
    """Markdown: one table per task (rows probe x metric, columns backbones), then pairs."""
    lines = [
        "# Results",
        "",
        (
            "Estimates on the test split with 95% bootstrap intervals over test patients. "
            f"Reference backbone for the paired comparisons: **{backbones[0]}**."
        ),
        "",
    ]
    for task in tasks:
        rows = metrics[metrics["task"] == task]
        category = rows["category"].iloc[0]
        counts = _task_counts(results, task, backbones)
        lines += [f"## {task} ({category})", "", counts, ""]
        header = "| probe | metric | " + " | ".join(backbones) + " |"
        lines += [header, "|" + "---|" * (len(backbones) + 2)]
        for (probe, metric), group in rows.groupby(["probe", "metric"], sort=False, dropna=False):
            by_backbone = {r["backbone"]: _format_cell(r) for _, r in group.iterrows()}
            cells = [by_backbone.get(b, "-") for b in backbones]
            metric_name = metric if isinstance(metric, str) else ""
            lines.append(f"| {probe} | {metric_name} | " + " | ".join(cells) + " |")
        lines += _notes(rows, backbones)
        lines.append("")
    if len(paired):
        lines += [
            f"## Paired differences against {backbones[0]}",
            "",
            (
                "Difference = reference minus other backbone, on the same test patients "
                "(for MAE a negative difference favours the reference)."
            ),
            "",
            "| task | probe | metric | other backbone | difference [95% CI] | p |",
            "|---|---|---|---|---|---|",
        ]
        for r in paired.itertuples(index=False):
            lines.append(
                f"| {r.task} | {r.probe} | {r.metric} | {r.other} | "
                f"{r.difference:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] | {r.p_value:.3g} |"
            )
    return "\n".join(lines) + "\n"


def _notes(rows: pd.DataFrame, backbones: Sequence[str]) -> list[str]:
    """A task's probe notes, each saying which backbone(s) it belongs to."""
    noted = rows[rows["note"].fillna("").astype(str).str.len() > 0]
    present = [b for b in backbones if b in set(rows["backbone"])]
    lines = []
    for (probe, note), group in noted.groupby(["probe", "note"], sort=False):
        owners = [b for b in present if b in set(group["backbone"])]
        who = "every backbone" if owners == present and len(present) > 1 else ", ".join(owners)
        lines.append(f"\n*{probe}* ({who}): {note}")
    return lines


def _task_counts(results: Mapping[tuple[str, str], Path], task: str, backbones) -> str:
    for backbone in backbones:
        if (task, backbone) in results:
            info = json.loads((results[(task, backbone)] / TASK_FILE).read_text())
            scans, patients = info["n_scans"], info["n_patients"]
            text = ", ".join(
                f"{split} {scans[split]} scans / {patients[split]} patients"
                for split in ("train", "val", "test")
                if scans[split]
            )
            dropped = len(info["dropped_scans"])
            return f"Rows: {text}" + (
                f"; {dropped} scans left out (see task.json)" if dropped else ""
            )
    return ""


def _paired_comparisons(results, tasks, backbones, categories, bootstrap) -> pd.DataFrame:
    from voxelfm.probes import classification, regression, survival
    from voxelfm.stats.bootstrap import paired_bootstrap

    metric_sources = {
        "classification": classification.metric_functions(None),
        "regression": regression.metric_functions(),
        "survival": survival.metric_functions(),
    }
    reference, others = backbones[0], backbones[1:]
    rows = []
    for task in tasks:
        category = categories[task]
        if category not in _PAIRED_METRICS or (task, reference) not in results:
            continue  # retrieval and the dense categories have no per-scan score pairing
        functions = {m: metric_sources[category][m] for m in _PAIRED_METRICS[category]}
        ref_predictions = _test_predictions(results[(task, reference)])
        label_columns = json.loads((results[(task, reference)] / TASK_FILE).read_text())["task"][
            "labels"
        ]
        for other in others:
            if (task, other) not in results:
                continue
            other_predictions = _test_predictions(results[(task, other)])
            common = ref_predictions.index.intersection(other_predictions.index, sort=False)
            ref_rows, other_rows = ref_predictions.loc[common], other_predictions.loc[common]
            y = _targets(ref_rows, category, label_columns)
            probes = [c.split(":")[1] for c in ref_rows.columns if c.startswith("score:")]
            for probe in dict.fromkeys(probes):
                try:
                    scores_ref = score_matrix(ref_rows, probe)
                    scores_other = score_matrix(other_rows, probe)
                except KeyError:  # the other backbone skipped this probe
                    continue
                compared = paired_bootstrap(
                    functions,
                    y,
                    scores_ref,
                    scores_other,
                    ref_rows["patient_id"].to_numpy(),
                    n_boot=bootstrap.n_boot,
                    seed=bootstrap.seed,
                    confidence=bootstrap.confidence,
                )
                for metric, result in compared.items():
                    rows.append(
                        {
                            "task": task,
                            "probe": probe,
                            "metric": metric,
                            "reference": reference,
                            "other": other,
                            "estimate_reference": result.estimate_a,
                            "estimate_other": result.estimate_b,
                            "difference": result.difference,
                            "ci_low": result.lower,
                            "ci_high": result.upper,
                            "p_value": result.p_value,
                            "n_test_scans": len(common),
                        }
                    )
    return pd.DataFrame(
        rows,
        columns=[
            "task",
            "probe",
            "metric",
            "reference",
            "other",
            "estimate_reference",
            "estimate_other",
            "difference",
            "ci_low",
            "ci_high",
            "p_value",
            "n_test_scans",
        ],
    )


def _test_predictions(result_dir: Path) -> pd.DataFrame:
    """Test rows of ``predictions.csv``, indexed by scan_id."""
    predictions = pd.read_csv(
        result_dir / PREDICTIONS_FILE, dtype={"scan_id": str, "patient_id": str}
    )
    return predictions[predictions["split"] == "test"].set_index("scan_id")


def _targets(rows: pd.DataFrame, category: str, label_columns: Sequence[str]) -> np.ndarray:
    if category == "survival":
        return rows[list(label_columns)].to_numpy(dtype=np.float64)
    if category == "regression":
        return rows[label_columns[0]].to_numpy(dtype=np.float64)
    columns = label_columns[0] if len(label_columns) == 1 else list(label_columns)
    return rows[columns].to_numpy(dtype=np.int64)


def _first_probe(predictions: pd.DataFrame) -> str | None:
    probes = [c.split(":")[1] for c in predictions.columns if c.startswith("score:")]
    return probes[0] if probes else None


def _efficiency_table(per_backbone: Mapping[str, Path]) -> pd.DataFrame | None:
    frames = [
        pd.read_csv(path / EFFICIENCY_FILE).assign(backbone=backbone)
        for backbone, path in per_backbone.items()
        if (path / EFFICIENCY_FILE).is_file()
    ]
    return pd.concat(frames, ignore_index=True) if frames else None


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


def markdown_to_html(markdown: str, title: str = "Results") -> str:
    """A standalone HTML page of the Markdown this module writes (headings, paragraphs,
    pipe tables, *emphasis*, **bold**): the results as the Snakemake report shows them."""
    import html
    import re

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", text)

    body: list[str] = []
    table: list[list[str]] = []

    def close_table() -> None:
        if not table:
            return
        header, *data = table
        body.append("<table>")
        body.append("<tr>" + "".join(f"<th>{inline(c)}</th>" for c in header) + "</tr>")
        for row in data:
            body.append("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>")
        body.append("</table>")
        table.clear()

    for line in markdown.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} and c for c in cells):  # skip the |---| rule
                table.append(cells)
            continue
        close_table()
        if not stripped:
            continue
        level = len(stripped) - len(stripped.lstrip("#"))
        if level and stripped[level : level + 1] == " ":
            body.append(f"<h{level}>{inline(stripped[level + 1 :])}</h{level}>")
        else:
            body.append(f"<p>{inline(stripped)}</p>")
    close_table()
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:1em auto;font-size:14px}"
        "table{border-collapse:collapse;margin:0.5em 0}"
        "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "th{background:#f3f3f3}"
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def plot_roc_curves(per_backbone: Mapping[str, Path], task: str) -> Figure | None:
    """Test ROC curve of the first probe of a binary task, one line per backbone."""
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = Figure(figsize=(4.5, 4.2), layout="constrained")
    axes = figure.add_subplot()
    drawn = False
    for backbone, path in per_backbone.items():
        predictions = _test_predictions(path)
        info = json.loads((path / TASK_FILE).read_text())["task"]
        probe = _first_probe(predictions)
        if probe is None or len(info["labels"]) != 1 or f"score:{probe}" not in predictions:
            continue  # multi-class or multi-label: no single ROC curve
        y = predictions[info["labels"][0]].to_numpy()
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
    from voxelfm.probes.survival import kaplan_meier_risk_groups
    from voxelfm.stats.plots import draw_risk_groups

    figure = Figure(figsize=(3.6 * len(per_backbone), 3.4), layout="constrained")
    axes_row = figure.subplots(1, len(per_backbone), squeeze=False)[0]
    for axes, (backbone, path) in zip(axes_row, per_backbone.items()):
        predictions = pd.read_csv(path / PREDICTIONS_FILE)
        info = json.loads((path / TASK_FILE).read_text())["task"]
        probe = _first_probe(predictions)
        if probe is None:
            axes.set_title(f"{backbone}: no probe")
            continue
        train, test = predictions["split"] == "train", predictions["split"] == "test"
        risk = score_matrix(predictions, probe)
        groups = kaplan_meier_risk_groups(
            risk[train], risk[test], predictions.loc[test, info["labels"]].to_numpy(float)
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
    from voxelfm.stats.plots import plot_data_efficiency

    figure = plot_data_efficiency(efficiency, metric, group_column="backbone")
    figure.axes[0].set_title(f"{task}: {efficiency['probe'].iloc[0]} ({metric})")
    return figure
