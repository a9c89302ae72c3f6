"""Every evaluation task category, declared once: its runner, rule, probes, options, metrics.

A task's ``category`` (``evaluation.tasks.<name>.category``) names one entry of
:data:`CATEGORIES`. The entry says

* ``runner``: the function that evaluates a task of the category (:class:`CategoryRunner`);
* ``rule``: the workflow rule that runs it (``probe``: one vector per scan, light;
  ``probe_dense``: patch tokens, label maps or text, trains a network and may use a GPU);
* ``probes`` / ``default_probes``: the probe names a task may list, and those it gets when
  it lists none;
* ``label_columns``: how many label-table columns a task names (None: one or more);
* ``options``: the parser of the task's ``options`` mapping (None: the category takes none);
* ``metrics``: the metric names of its ``metrics.csv`` rows (``<...>`` marks a part filled
  in per task, e.g. a class name);
* ``prepare``: optionally narrows the task's scans before the runner sees them (the scans
  left out are reported in ``task.json``).

Adding a category is one new module with its runner plus one :func:`register` call here (see
docs/contributing.md). Importing this module does not import torch: the runners import their
network code when they run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import pandas as pd

from voxelfm.errors import VoxelFMError
from voxelfm.evaluation.localisation import localisation_options, run_localisation
from voxelfm.evaluation.report_generation import METRICS as REPORT_METRICS
from voxelfm.evaluation.report_generation import report_options, run_report_generation
from voxelfm.evaluation.results import BootstrapSettings, DenseContext
from voxelfm.evaluation.retrieval import METRICS as RETRIEVAL_METRICS
from voxelfm.evaluation.retrieval import PROTOCOLS as RETRIEVAL_PROTOCOLS
from voxelfm.evaluation.retrieval import run_retrieval
from voxelfm.evaluation.segmentation import (
    run_segmentation,
    scans_with_label_map,
    segmentation_options,
)
from voxelfm.evaluation.vector_probes import run_vector_probes
from voxelfm.probes.registry import PROBE_FITTERS

if TYPE_CHECKING:
    from voxelfm.evaluation.tasks import EvaluationTask, TaskData

Rule = Literal["probe", "probe_dense"]
RULES: tuple[Rule, ...] = ("probe", "probe_dense")


class CategoryRunner(Protocol):
    """Evaluates one task on one backbone's embeddings; writes its files into ``out`` and
    returns the ``metrics.csv`` rows (``voxelfm.evaluation.results.metric_rows``)."""

    def __call__(
        self,
        task: EvaluationTask,
        data: TaskData,
        embeddings: Any,
        bootstrap: BootstrapSettings,
        out: Path,
        context: DenseContext,
    ) -> pd.DataFrame: ...


@dataclass(frozen=True)
class TaskCategory:
    """One task category (see the module docstring for the fields)."""

    name: str
    runner: CategoryRunner
    rule: Rule
    probes: tuple[str, ...]
    default_probes: tuple[str, ...]
    label_columns: int | None
    metrics: tuple[str, ...]
    options: Callable[[EvaluationTask], Any] | None = None
    prepare: Callable[[EvaluationTask, TaskData, DenseContext], TaskData] | None = None


class CategoryRegistry(Mapping[str, TaskCategory]):
    """The categories by name, in registration order (the order of the config schema)."""

    def __init__(self) -> None:
        self._categories: dict[str, TaskCategory] = {}

    def __getitem__(self, name: str) -> TaskCategory:
        return self._categories[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._categories)

    def __len__(self) -> int:
        return len(self._categories)

    def register(self, category: TaskCategory) -> TaskCategory:
        if category.name in self._categories:
            raise VoxelFMError(f"task category {category.name!r} is already registered")
        if category.rule not in RULES:
            raise VoxelFMError(f"category {category.name!r}: rule must be one of {RULES}")
        extra = sorted(set(category.default_probes) - set(category.probes))
        if not category.default_probes or extra:
            raise VoxelFMError(
                f"category {category.name!r}: default probes must be a non-empty subset of "
                f"its probes (not {extra})"
            )
        self._categories[category.name] = category
        return category

    def unregister(self, name: str) -> TaskCategory:
        """Remove a category (tests register toy categories and remove them afterwards)."""
        return self._categories.pop(name)


CATEGORIES = CategoryRegistry()
register = CATEGORIES.register


def _vector_probe_category(name: str, label_columns: int | None, metrics, defaults) -> TaskCategory:
    return TaskCategory(
        name=name,
        runner=run_vector_probes,
        rule="probe",
        probes=tuple(PROBE_FITTERS[name]),
        default_probes=defaults,
        label_columns=label_columns,
        metrics=metrics,
    )


register(
    _vector_probe_category(
        "classification",
        None,
        ("auroc", "auprc", "balanced_accuracy"),
        ("logistic", "knn", "attentive"),
    )
)
register(_vector_probe_category("regression", 1, ("mae", "r2", "pearson_r"), ("ridge", "mlp")))
register(_vector_probe_category("survival", 2, ("c_index",), ("cox", "mlp_cox")))
register(
    TaskCategory(
        name="retrieval",
        runner=run_retrieval,
        rule="probe",
        probes=RETRIEVAL_PROTOCOLS,
        default_probes=RETRIEVAL_PROTOCOLS,
        label_columns=0,
        metrics=RETRIEVAL_METRICS,
    )
)
# localisation: the structure's centre, RAS world mm (x, y, z columns).
register(
    TaskCategory(
        name="localisation",
        runner=run_localisation,
        rule="probe_dense",
        probes=("soft_argmax",),
        default_probes=("soft_argmax",),
        label_columns=3,
        metrics=("mean_error_mm", "median_error_mm", "hit_rate@<radius>mm"),
        options=localisation_options,
    )
)
# segmentation: the targets are label maps in the volume store, not label-table columns.
register(
    TaskCategory(
        name="segmentation",
        runner=run_segmentation,
        rule="probe_dense",
        probes=("conv_decoder",),
        default_probes=("conv_decoder",),
        label_columns=0,
        metrics=("dice:<class>", "dice_macro", "dice_micro"),
        options=segmentation_options,
        prepare=scans_with_label_map,
    )
)
# report_generation: the one label column is the report text.
register(
    TaskCategory(
        name="report_generation",
        runner=run_report_generation,
        rule="probe_dense",
        probes=("decoder", "nearest_neighbour", "llm"),
        default_probes=("decoder", "nearest_neighbour"),
        label_columns=1,
        metrics=REPORT_METRICS,
        options=report_options,
    )
)
