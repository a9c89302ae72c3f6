"""Baseline report probe: copy the report of the most similar training scan.

Similarity is the cosine of the global feature vectors, so the baseline measures how much of
a report the embedding's neighbourhood alone recovers, with nothing learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from voxelfm.errors import VoxelFMError


@dataclass
class NearestNeighbourProbe:
    """``generate(features)`` returns, per row, the report of its nearest training scan."""

    train_features: np.ndarray  # (n_train, D) unit rows
    train_reports: list[str]

    name = "nearest_neighbour"

    @property
    def hyperparameters(self) -> dict[str, str]:
        return {"similarity": "cosine"}

    def neighbours(self, features: np.ndarray) -> np.ndarray:
        """(n,) index of the nearest training scan (first one on ties)."""
        similarity = _unit_rows(features) @ self.train_features.T  # (n, n_train)
        return similarity.argmax(axis=1)

    def generate(self, features: np.ndarray) -> list[str]:
        return [self.train_reports[i] for i in self.neighbours(features)]


def fit_nearest_neighbour(
    features_train: np.ndarray, reports_train: Sequence[str]
) -> NearestNeighbourProbe:
    """Index the (n, D) global features of the training scans and their reports."""
    features_train = np.asarray(features_train, dtype=np.float64)
    if features_train.ndim != 2 or len(features_train) != len(reports_train):
        raise VoxelFMError(
            f"nearest neighbour needs (n, D) features for n reports, got {features_train.shape} "
            f"for {len(reports_train)}"
        )
    if len(features_train) == 0:
        raise VoxelFMError("nearest neighbour needs at least one training report")
    return NearestNeighbourProbe(_unit_rows(features_train), [str(r) for r in reports_train])


def _unit_rows(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    # An all-zero vector has no direction: it matches nothing better than anything else.
    return features / np.where(norms > 0, norms, 1.0)
