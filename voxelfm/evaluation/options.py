"""Category options (``evaluation.tasks.<name>.options``): converted and checked in one way.

Each category that takes options declares a table ``option name -> converter`` and parses
a task's options with :func:`convert_options`; unknown keys and values a converter rejects
are errors naming the task, never ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from voxelfm.errors import VoxelFMError

OptionTable = Mapping[str, Callable[[Any], Any]]


def float_tuple(values) -> tuple[float, ...]:
    return tuple(float(x) for x in values)


def convert_options(task, table: OptionTable, category: str) -> dict[str, Any]:
    """``task.options`` converted by ``table``; raises on an unknown key or a bad value."""
    unknown = sorted(set(task.options) - set(table))
    if unknown:
        raise VoxelFMError(
            f"task {task.name!r}: unknown {category} option(s) {unknown}; known: {sorted(table)}"
        )
    try:
        return {key: table[key](value) for key, value in task.options.items()}
    except (TypeError, ValueError) as error:
        raise VoxelFMError(f"task {task.name!r}: bad {category} option: {error}") from None
