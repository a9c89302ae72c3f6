"""Evaluation of frozen backbones: tasks from config, probes per (backbone, task), the report.

``run_task`` evaluates one task on one backbone's embedding store; ``aggregate`` puts every
result side by side. Both are what the workflow's ``probe`` and ``aggregate`` rules call.
"""

from voxelfm.evaluation.report import aggregate
from voxelfm.evaluation.run import BootstrapSettings, run_task
from voxelfm.evaluation.tasks import TaskSpec, align_task, read_label_table

__all__ = [
    "BootstrapSettings",
    "TaskSpec",
    "aggregate",
    "align_task",
    "read_label_table",
    "run_task",
]
