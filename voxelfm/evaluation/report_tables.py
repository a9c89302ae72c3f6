"""The report's tables: ``results.md`` and the same page as HTML for ``snakemake --report``.

One table per task (rows probe x metric, backbones as columns, each cell the estimate with
its 95% interval), the task's row counts and probe notes, then the paired comparisons.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from voxelfm.evaluation.report_inputs import task_record


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


def _format_cell(row: pd.Series) -> str:
    if pd.isna(row["estimate"]):
        return str(row.get("note") or "n/a")
    if pd.isna(row.get("ci_low")) or pd.isna(row.get("ci_high")):
        return f"{row['estimate']:.3f}"
    return f"{row['estimate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


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
            info = task_record(results[(task, backbone)])
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


def markdown_to_html(markdown: str, title: str = "Results") -> str:
    """A standalone HTML page of the Markdown :func:`results_markdown` writes (headings,
    paragraphs, pipe tables, *emphasis*, **bold**): the results as the Snakemake report
    shows them."""

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
