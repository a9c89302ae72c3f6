"""Checks of a workflow config that need no job to run: called by the Snakefile at DAG time.

Each check returns problems as single lines naming the config key and the file, so a typo
in a label column, a probe name, a dataset root or a manifest path stops the dry run
instead of a probe job after ingestion and embedding. What the workflow itself produces
(a synthetic cohort, an adapter's label table) is checked when it already exists.

No torch here: the Snakefile imports this module at parse time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from voxelfm.errors import VoxelFMError
from voxelfm.synth.tables import SCAN_TABLES

_ENV_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
LABEL_TABLE_FILE = "labels.csv"
MANIFEST_FILE = "manifest.csv"


def unset_variables(text: str) -> list[str]:
    """The environment variables ``text`` names ($NAME or ${NAME}) that are not set."""
    return [name for name in _ENV_VARIABLE.findall(text) if name not in os.environ]


def adapter_root(dataset: str, spec: Mapping[str, Any]) -> str:
    """The adapter's root with environment variables expanded; a ValueError naming the
    variable the config uses when one is unset."""
    root = str(spec["root"])
    missing = unset_variables(root)
    if missing:
        names = ", ".join(missing)
        raise ValueError(
            f"datasets.{dataset}.adapter.root {root!r} names the unset environment variable "
            f"{names}; set it (e.g. {missing[0]}=/path/to/data snakemake ...) or edit the config"
        )
    return os.path.expandvars(root)


def dataset_problems(datasets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Dataset roots, manifests (and every image and label map they name) and label tables
    that do not exist."""
    from voxelfm.ingest.manifest import read_manifest

    problems = []
    for name, spec in datasets.items():
        if "adapter" in spec:
            try:
                root = adapter_root(name, spec["adapter"])
            except ValueError as error:
                problems.append(str(error))
                continue
            if not Path(root).is_dir():
                problems.append(f"datasets.{name}.adapter.root: {root} is not a folder")
        if "manifest" in spec:
            try:
                # Empty is the validate_manifest job's to report; here: do the files exist.
                read_manifest(spec["manifest"], strict=True, allow_empty=True)
            except VoxelFMError as error:
                problems.append(f"datasets.{name}.manifest: {error}")
        if "labels" in spec and not _label_file(spec["labels"]).is_file():
            problems.append(f"datasets.{name}.labels: {spec['labels']} does not exist")
    return problems


def task_problems(
    config: Mapping[str, Any], label_tables: Mapping[str, str | os.PathLike | None]
) -> list[str]:
    """Unknown categories, probes and settings of each task, and label columns (and
    segmentation label maps) its dataset's tables do not have.

    label_tables: dataset -> its label table (CSV or folder with labels.csv), or None.
    """
    from voxelfm.evaluation.tasks import EvaluationTask

    evaluation = config["evaluation"]
    default_dataset = evaluation.get("dataset") or min(config["datasets"])
    problems = []
    for name, settings in evaluation.get("tasks", {}).items():
        dataset = settings.get("dataset") or default_dataset
        if dataset not in config["datasets"]:
            problems.append(f"evaluation.tasks.{name}.dataset: {dataset!r} is not in datasets")
            continue
        try:
            task = EvaluationTask.from_config(
                name, {k: v for k, v in settings.items() if k != "dataset"}
            )
        except VoxelFMError as error:
            reason = str(error).removeprefix(f"task {name!r}: ")
            problems.append(f"evaluation.tasks.{name}: {reason}")
            continue
        table = label_tables.get(dataset)
        columns = _csv_header(_label_file(table)) if table is not None else None
        where = _label_file(table) if columns is not None else None
        if columns is not None:
            # as align_task: retrieval fits nothing, so it needs no split column
            split = [] if task.category == "retrieval" else [task.split_column]
            wanted = [*task.labels, *split]
            missing = [c for c in wanted if c not in columns]
            if missing:
                problems.append(
                    f"evaluation.tasks.{name}: label column(s) {', '.join(missing)} not in "
                    f"{where} (it has {', '.join(columns)})"
                )
        label_map = (task.options or {}).get("label_map")
        spec = config["datasets"][dataset]
        if task.category == "segmentation" and label_map:
            if "manifest" in spec:
                source, header = spec["manifest"], _csv_header(Path(spec["manifest"]))
            elif "synthetic" in spec:
                source, header = "the synthetic manifest", synthetic_columns(MANIFEST_FILE)
            else:
                source, header = "", None
            if header and f"label_{label_map}" not in header:
                known = [c[len("label_") :] for c in header if c.startswith("label_")]
                problems.append(
                    f"evaluation.tasks.{name}.options.label_map: {label_map!r} is not a label "
                    f"map of {source} (it has {', '.join(known) or 'none'})"
                )
    return problems


def synthetic_columns(table: str) -> list[str]:
    """The columns the synthetic cohort generator writes into ``table``."""
    return list(SCAN_TABLES[table])


def _label_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / LABEL_TABLE_FILE if path.is_dir() else path


def _csv_header(path: Path) -> list[str] | None:
    """The column names of a CSV/TSV file, or None when it does not exist (yet)."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8-sig") as stream:
        first = stream.readline().rstrip("\r\n")
    delimiter = "\t" if "\t" in first else ","
    return [column.strip() for column in first.split(delimiter)]
