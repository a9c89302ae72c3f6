"""Evaluation of frozen backbones: tasks from config, probes per (backbone, task), the report.

``run_task`` evaluates one task on one backbone's embedding store; ``aggregate`` puts every
result side by side. Both are what the workflow's ``probe`` and ``aggregate`` rules call.

The names below are imported on first use: the Snakefile reads ``evaluation.tasks`` at parse
time (on every job of a cluster run), and the report's plotting stack is not needed there.
"""

from importlib import import_module

_EXPORTS = {
    "aggregate": "voxelfm.evaluation.report",
    "BootstrapSettings": "voxelfm.evaluation.results",
    "run_task": "voxelfm.evaluation.run",
    "EvaluationTask": "voxelfm.evaluation.tasks",
    "align_task": "voxelfm.evaluation.tasks",
    "read_label_table": "voxelfm.evaluation.tasks",
}

__all__ = [
    "BootstrapSettings",
    "EvaluationTask",
    "aggregate",
    "align_task",
    "read_label_table",
    "run_task",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'voxelfm.evaluation' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
