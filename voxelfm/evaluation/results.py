"""What every category runner receives and writes: settings, context, the result files.

A runner (see ``voxelfm.evaluation.categories``) gets the bootstrap settings and a
``DenseContext`` and returns ``metrics.csv`` rows built with :func:`metric_rows`; the files it
writes next to them are named here, so the report reads them without knowing the runner.
This module sits below the runners and ``run.py`` so that neither has to import the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

METRICS_FILE = "metrics.csv"
PREDICTIONS_FILE = "predictions.csv"
EFFICIENCY_FILE = "efficiency.csv"
RANKS_FILE = "retrieval_ranks.csv"
TASK_FILE = "task.json"


@dataclass(frozen=True)
class BootstrapSettings:
    n_boot: int = 1000
    confidence: float = 0.95
    seed: int = 0

    @classmethod
    def from_config(cls, spec: Mapping[str, Any] | None) -> BootstrapSettings:
        return cls(**dict(spec or {}))


@dataclass
class DenseContext:
    """What dense probes need beyond the embeddings and the label table.

    volumes: a ``voxelfm.store.VolumeStore`` holding the scans and their label maps on the
        canonical grid (segmentation targets), or None.
    sources: scan_id -> path of the source image (manifest ``image``), so predicted label
        maps can be written back in the source image's space; empty: no write-back.
    """

    volumes: Any = None
    sources: Mapping[str, str] = field(default_factory=dict)


def metric_rows(probe: str, intervals: Mapping[str, Any], **columns: Any) -> list[dict]:
    """One metrics.csv row per bootstrapped metric; ``columns`` fill the shared fields."""
    shared = {
        "validation_score": np.nan,
        "hyperparameters": "{}",
        "decision_threshold": "null",
        "note": "",
        **columns,
    }
    return [
        {
            "probe": probe,
            "metric": metric,
            "estimate": result.estimate,
            "ci_low": result.lower,
            "ci_high": result.upper,
            "n_boot_valid": result.n_boot_valid,
            **shared,
        }
        for metric, result in intervals.items()
    ]


def skipped_row(probe: str, reason: str) -> dict[str, Any]:
    return {"probe": probe, "metric": None, "estimate": np.nan, "note": f"skipped: {reason}"}


def add_score_columns(frame: pd.DataFrame, probe: str, scores: np.ndarray) -> None:
    """Store ``probe``'s (n,) or (n, k) scores as ``score:<probe>`` / ``score:<probe>:<j>``."""
    if scores.ndim == 1:
        frame[f"score:{probe}"] = scores
    else:
        for j in range(scores.shape[1]):
            frame[f"score:{probe}:{j}"] = scores[:, j]


def score_matrix(predictions: pd.DataFrame, probe: str) -> np.ndarray:
    """The scores ``add_score_columns`` stored for ``probe``: (n,) or (n, k)."""
    if f"score:{probe}" in predictions:
        return predictions[f"score:{probe}"].to_numpy()
    columns = sorted(
        (c for c in predictions.columns if c.startswith(f"score:{probe}:")),
        key=lambda c: int(c.rsplit(":", 1)[1]),
    )
    if not columns:
        raise KeyError(f"no scores of probe {probe!r}")
    return predictions[columns].to_numpy()
