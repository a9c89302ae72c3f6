"""Figures for probe results.

Built on ``matplotlib.figure.Figure`` rather than pyplot, so no global backend or figure
registry is touched: the figures render with Agg on ``savefig`` in headless pipeline jobs.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from voxelfm.probes.survival import RiskGroupCurves

_RISK_GROUP_COLOURS = {"low risk": "tab:blue", "high risk": "tab:red"}


def draw_risk_groups(axes, curves: RiskGroupCurves, title: str | None = None) -> None:
    """Kaplan-Meier curves (95% CI bands) of the risk groups on ``axes``, titled with the
    log-rank p-value unless a title is given."""
    for name, curve in curves.curves.items():
        colour = _RISK_GROUP_COLOURS.get(name)
        label = f"{name} (n={curves.group_sizes[name]})"
        axes.step(curve["time"], curve["survival"], where="post", color=colour, label=label)
        axes.fill_between(
            curve["time"], curve["lower"], curve["upper"], step="post", color=colour, alpha=0.2
        )
    axes.set(xlabel="time", ylim=(0, 1.02))
    axes.set_title(title or f"log-rank p = {curves.logrank_p_value:.3g}", fontsize=9)
    axes.legend(loc="lower left", fontsize=7)


def plot_risk_groups(curves: RiskGroupCurves, title: str | None = None) -> Figure:
    """One figure of ``draw_risk_groups``."""
    figure = Figure(figsize=(5, 4), layout="constrained")
    axes = figure.add_subplot()
    draw_risk_groups(axes, curves, title)
    axes.set_ylabel("survival probability")
    return figure


def plot_data_efficiency(
    results: pd.DataFrame, metric: str, group_column: str | None = None
) -> Figure:
    """Mean +- standard deviation over repeats of ``metric`` against labelled patients.

    Args:
        results: frame from ``label_efficiency_sweep`` (optionally several, concatenated with a
            column such as "backbone" named by ``group_column``, one line per group).
        metric: which metric to plot, e.g. "auroc".
    """
    figure = Figure(figsize=(5, 4), layout="constrained")
    axes = figure.add_subplot()
    selected = results[results["metric"] == metric]
    groups = selected.groupby(group_column) if group_column else [(None, selected)]
    for name, group in groups:
        summary = group.groupby("n_train_patients")["value"].agg(["mean", "std"]).fillna({"std": 0})
        x = summary.index.to_numpy()
        axes.plot(x, summary["mean"], marker="o", label=name)
        axes.fill_between(
            x, summary["mean"] - summary["std"], summary["mean"] + summary["std"], alpha=0.2
        )
    axes.set(xscale="log", xlabel="labelled training patients", ylabel=metric)
    # Ticks at the measured counts, written as plain numbers: a log axis spanning less than a
    # decade otherwise labels its minor ticks "4x10^1".
    counts = sorted(selected["n_train_patients"].unique())
    if counts:
        axes.set_xticks(
            counts, [f"{int(c)}" if float(c).is_integer() else f"{c:g}" for c in counts]
        )
        axes.xaxis.set_minor_formatter(NullFormatter())
    if group_column:
        axes.legend(title=group_column)
    return figure
