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

The parts live beside it: ``report_inputs`` (reading a run_task folder), ``report_tables``
(results.md and results.html), ``paired_comparisons`` (paired.csv), ``report_figures``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from voxelfm.evaluation.paired_comparisons import paired_comparisons
from voxelfm.evaluation.report_figures import (
    CATEGORY_FIGURES,
    PRIMARY_METRIC,
    plot_efficiency,
    plot_overview,
    save_figure,
)
from voxelfm.evaluation.report_inputs import efficiency_table
from voxelfm.evaluation.report_tables import markdown_to_html, results_markdown
from voxelfm.evaluation.results import METRICS_FILE, BootstrapSettings
from voxelfm.utils.atomic import atomic_directory

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
RESULTS_HTML = "results.html"  # the same tables, for the Snakemake report
PAIRED_CSV = "paired.csv"
FIGURES_DIR = "figures"  # where a run_task folder keeps the figures its dense probes drew


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
    paired = paired_comparisons(results, tasks, backbones, categories, bootstrap)
    with atomic_directory(out_dir) as tmp:
        metrics.to_csv(tmp / RESULTS_CSV, index=False)
        paired.to_csv(tmp / PAIRED_CSV, index=False)
        markdown = results_markdown(metrics, paired, backbones, tasks, results)
        (tmp / RESULTS_MD).write_text(markdown)
        (tmp / RESULTS_HTML).write_text(markdown_to_html(markdown, title="Results"))
        save_figure(plot_overview(metrics, backbones, tasks), tmp / "overview.png")
        for task in tasks:
            category = categories[task]
            per_backbone = {b: results[(task, b)] for b in backbones if (task, b) in results}
            if category in CATEGORY_FIGURES:
                prefix, plot = CATEGORY_FIGURES[category]
                drawn = plot(per_backbone, task)
                if drawn is not None:
                    save_figure(drawn, tmp / f"{prefix}_{task}.png")
            for backbone, path in per_backbone.items():
                for png in sorted((path / FIGURES_DIR).glob("*.png")):
                    shutil.copyfile(png, tmp / f"{task}__{backbone}__{png.name}")
            efficiency = efficiency_table(per_backbone)
            if efficiency is not None:
                save_figure(
                    plot_efficiency(efficiency, PRIMARY_METRIC[category], task),
                    tmp / f"efficiency_{task}.png",
                )
    return Path(out_dir)
