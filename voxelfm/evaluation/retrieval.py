"""The retrieval category: instance retrieval of another scan of the same patient.

Nothing is fitted, so every scan queries. ``gallery``: all other scans are the gallery
(recall@k and mAP); ``pool``: one positive among random negatives of other patients
(recall@k). Intervals resample query patients. Writes ``retrieval_ranks.csv`` (the rank of
every query or trial) and ``predictions.csv`` (the scans used).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from voxelfm.evaluation.results import (
    PREDICTIONS_FILE,
    RANKS_FILE,
    BootstrapSettings,
    DenseContext,
    metric_rows,
)
from voxelfm.probes.retrieval import (
    DEFAULT_KS,
    N_NEGATIVES,
    instance_gallery_ranks,
    instance_pool_trials,
    recall_hits,
)
from voxelfm.stats.bootstrap import bootstrap_grouped_means

PROTOCOLS = ("gallery", "pool")
METRICS = (*(f"recall@{k}" for k in DEFAULT_KS), "mAP")


def run_retrieval(
    task,
    data,
    embeddings,
    bootstrap: BootstrapSettings,
    out: Path,
    context: DenseContext,
) -> pd.DataFrame:
    """Rank every query under each protocol of ``task.probes``; returns the metric rows."""
    features = embeddings.global_features(task.features)[data.embedding_rows]
    patient_ids = data.rows["patient_id"].to_numpy()
    rows, rank_frames = [], []
    for protocol in task.probes:
        if protocol == "gallery":
            ranks = instance_gallery_ranks(features, patient_ids, seed=task.seed)
            rank_column, note = "first_positive_rank", "all other scans are the gallery"
            per_row = recall_hits(ranks[rank_column].to_numpy(), DEFAULT_KS)
            per_row["mAP"] = ranks["average_precision"].to_numpy()
        else:
            # The paper draws 99 negatives; a cohort with fewer other patients uses them all,
            # and the note records the pool so chance level (k / pool) can be read off.
            max_negatives = _min_other_patient_scans(patient_ids)
            n_negatives = min(N_NEGATIVES, max_negatives)
            ranks = instance_pool_trials(
                features, patient_ids, n_negatives=n_negatives, seed=task.seed
            )
            rank_column, note = "rank", f"1 positive among {n_negatives} random negatives"
            per_row = recall_hits(ranks[rank_column].to_numpy(), DEFAULT_KS)
        query_patients = patient_ids[ranks["query"].to_numpy()]
        intervals = bootstrap_grouped_means(
            per_row,
            query_patients,
            n_boot=bootstrap.n_boot,
            seed=bootstrap.seed,
            confidence=bootstrap.confidence,
        )
        rows += metric_rows(
            protocol,
            intervals,
            n_test_scans=len(ranks),
            n_test_patients=len(np.unique(query_patients)),
            note=note,
        )
        rank_frames.append(
            pd.DataFrame(
                {
                    "protocol": protocol,
                    "query_scan": data.rows["scan_id"].to_numpy()[ranks["query"].to_numpy()],
                    "query_patient": query_patients,
                    "rank": ranks[rank_column].to_numpy(),
                    "pool_size": (len(features) - 1 if protocol == "gallery" else n_negatives + 1),
                }
            )
        )
    pd.concat(rank_frames, ignore_index=True).to_csv(out / RANKS_FILE, index=False)
    data.rows.to_csv(out / PREDICTIONS_FILE, index=False)
    return pd.DataFrame(rows)


def _min_other_patient_scans(patient_ids: np.ndarray) -> int:
    _, counts = np.unique(patient_ids, return_counts=True)
    return int(len(patient_ids) - counts.max())
