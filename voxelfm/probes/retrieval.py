"""Retrieval with frozen embeddings under cosine similarity.

Two protocols, both returning *ranks* (1 = retrieved first) so that Recall@k, its bootstrap
over patients and any other summary come from the same numbers:

* Gallery retrieval (instance level): each scan whose patient has another scan queries all
  other scans; the positives are the other scans of the same patient. Gives the rank of the
  first positive (Recall@k) and the average precision (mAP).
* Pool retrieval, the paper's protocol (rmaguado/VoxelFM ``evaluation/CT_RATE/retrieval``):
  for every (query, positive) pair, the positive is ranked among ``n_negatives`` = 99
  negatives drawn at random without replacement, so chance Recall@k is k / 100 whatever the
  dataset size. Positives are same-patient scans (``instance_pool_trials``) or, as in the
  paper, scans sharing a finding label (``label_pool_trials``).

Ties are broken at random (seeded). The reference puts the positive first in the pool and uses
a stable sort, so a tied positive always wins; that makes a collapsed backbone (all
embeddings equal) score a perfect Recall@1 instead of chance. For continuous embeddings ties
do not occur and the two agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from voxelfm.errors import VoxelFMError

N_NEGATIVES = 99
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def _cosine_similarity(queries: np.ndarray, gallery: np.ndarray | None = None) -> np.ndarray:
    """(q, n) cosine similarities (sklearn's: zero vectors give 0; no gallery: the queries)."""
    # Imported on call: the Snakefile reaches this module at parse time through the task
    # categories, and sklearn takes longer to import than the rest of the parse.
    from sklearn.metrics.pairwise import cosine_similarity

    return cosine_similarity(queries, gallery)


def recall_hits(ranks: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Per query (or trial), whether its positive is ranked within the top k: the values
    whose mean is :func:`recall_at_k` and whose patient resamples give its interval."""
    ranks = np.asarray(ranks)
    return {f"recall@{k}": ranks <= k for k in ks}


def recall_at_k(ranks: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Fraction of queries (or trials) whose positive is ranked within the top k."""
    return {name: float(hits.mean()) for name, hits in recall_hits(ranks, ks).items()}


def _patients_with_several_scans(patient_ids: np.ndarray) -> np.ndarray:
    """Row indices of scans whose patient has at least one other scan."""
    _, inverse, counts = np.unique(patient_ids, return_inverse=True, return_counts=True)
    return np.flatnonzero(counts[inverse] > 1)


def instance_gallery_ranks(X: np.ndarray, patient_ids: Sequence, seed: int = 0) -> pd.DataFrame:
    """Rank every other scan for each query; positives are the other scans of its patient.

    Args:
        X: (n, d) embeddings.
        patient_ids: (n,) patient of each scan.
        seed: seeds the random tie-breaking.

    Returns:
        One row per query: ``query`` (row index), ``patient``, ``first_positive_rank`` (1-based,
        within the n - 1 other scans) and ``average_precision`` (mean over the query's positives
        of the precision at that positive's rank). Memory is O(n_queries x n).
    """
    X, patient_ids = np.asarray(X), np.asarray(patient_ids)
    queries = _patients_with_several_scans(patient_ids)
    if len(queries) == 0:
        raise VoxelFMError("instance retrieval needs at least one patient with two or more scans")
    similarity = _cosine_similarity(X[queries], X)  # (q, n)
    similarity[np.arange(len(queries)), queries] = -np.inf  # the query never retrieves itself
    random_tie_break = np.random.default_rng(seed).random(similarity.shape)
    # lexsort: the last key is primary, so order by descending similarity, then random.
    order = np.lexsort((random_tie_break, -similarity), axis=-1)[:, :-1]  # (q, n-1), self dropped
    is_positive = patient_ids[order] == patient_ids[queries][:, None]  # (q, n-1)
    ranks = np.arange(1, order.shape[1] + 1)
    precision_at_rank = np.cumsum(is_positive, axis=1) / ranks
    return pd.DataFrame(
        {
            "query": queries,
            "patient": patient_ids[queries],
            "first_positive_rank": is_positive.argmax(axis=1) + 1,
            "average_precision": (precision_at_rank * is_positive).sum(1) / is_positive.sum(1),
        }
    )


def rank_among_random_negatives(
    query_similarities: np.ndarray,
    positives: np.ndarray,
    negatives: np.ndarray,
    n_negatives: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Rank of each positive among ``n_negatives`` negatives drawn without replacement.

    Equivalent in distribution to drawing the negatives and sorting the pool, without
    materialising the draws: if G of the M candidate negatives are more similar to the query
    than the positive and E are tied with it, the number of drawn negatives above it is
    hypergeometric(G, M - G, n), the number tied is hypergeometric(E, M - G - E, n - above),
    and the positive lands uniformly among its ties.

    Args:
        query_similarities: (n,) similarity of the query to every scan.
        positives: (p,) row indices of this query's positives.
        negatives: (M,) row indices of its candidate negatives, M >= n_negatives.

    Returns:
        (p,) 1-based ranks in the pool of 1 + n_negatives.
    """
    if len(negatives) < n_negatives:
        raise VoxelFMError(
            f"the retrieval pool needs {n_negatives} negatives per query, "
            f"only {len(negatives)} available"
        )
    negative_similarity = np.sort(query_similarities[negatives])
    positive_similarity = query_similarities[positives]
    n_below = np.searchsorted(negative_similarity, positive_similarity, side="left")
    n_not_above = np.searchsorted(negative_similarity, positive_similarity, side="right")
    n_above, n_tied = len(negatives) - n_not_above, n_not_above - n_below
    drawn_above = rng.hypergeometric(n_above, n_below + n_tied, n_negatives)
    drawn_tied = rng.hypergeometric(n_tied, n_below, n_negatives - drawn_above)
    return 1 + drawn_above + rng.integers(0, drawn_tied + 1)


def instance_pool_trials(
    X: np.ndarray, patient_ids: Sequence, n_negatives: int = N_NEGATIVES, seed: int = 0
) -> pd.DataFrame:
    """The paper's 1-positive-among-99-negatives protocol with same-patient positives.

    Every ordered pair of distinct scans of one patient is a trial; negatives are scans of
    other patients.

    Returns:
        One row per trial: ``query``, ``positive`` (row indices), ``patient``, ``rank``.
    """
    X, patient_ids = np.asarray(X), np.asarray(patient_ids)
    queries = _patients_with_several_scans(patient_ids)
    if len(queries) == 0:
        raise VoxelFMError("instance retrieval needs at least one patient with two or more scans")
    similarity = _cosine_similarity(X[queries], X)  # (q, n)
    rng = np.random.default_rng(seed)
    frames = []
    for row, query in enumerate(queries):
        same_patient = patient_ids == patient_ids[query]
        positives = np.flatnonzero(same_patient & (np.arange(len(X)) != query))
        ranks = rank_among_random_negatives(
            similarity[row], positives, np.flatnonzero(~same_patient), n_negatives, rng
        )
        frames.append(
            pd.DataFrame(
                {
                    "query": query,
                    "positive": positives,
                    "patient": patient_ids[query],
                    "rank": ranks,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def label_pool_trials(
    X: np.ndarray,
    labels: np.ndarray,
    label_names: Sequence[str] | None = None,
    n_negatives: int = N_NEGATIVES,
    seed: int = 0,
) -> pd.DataFrame:
    """The paper's label retrieval: scans sharing a finding are positives, the rest negatives.

    For each label, every ordered pair of distinct positive scans is a trial; labels are
    processed from most to least frequent as in the reference.

    Args:
        X: (n, d) embeddings.
        labels: (n, L) 0/1 finding indicators.
        label_names: (L,) names; defaults to the column numbers.

    Returns:
        One row per trial: ``label``, ``query``, ``positive``, ``rank``.
    """
    labels = np.asarray(labels).astype(bool)
    names = (
        list(label_names) if label_names is not None else [str(i) for i in range(labels.shape[1])]
    )
    similarity = _cosine_similarity(X)  # (n, n)
    rng = np.random.default_rng(seed)
    frames = []
    for column in np.argsort(-labels.sum(0), kind="stable"):
        holders = np.flatnonzero(labels[:, column])
        negatives = np.flatnonzero(~labels[:, column])
        for query in holders:
            positives = holders[holders != query]
            ranks = rank_among_random_negatives(
                similarity[query], positives, negatives, n_negatives, rng
            )
            frames.append(
                pd.DataFrame(
                    {"label": names[column], "query": query, "positive": positives, "rank": ranks}
                )
            )
    return pd.concat(frames, ignore_index=True)


def label_recall_summary(trials: pd.DataFrame, ks: Iterable[int] = DEFAULT_KS) -> pd.DataFrame:
    """Recall@k per label and their unweighted mean over labels (the paper's macro average).

    Returns:
        One row per label plus a final ``label == "macro"`` row; columns ``n_trials`` and
        ``recall@k``.
    """
    ks = tuple(ks)
    per_label = trials.groupby("label", sort=False)["rank"].agg(
        n_trials="size", **{f"recall@{k}": (lambda r, k=k: (r <= k).mean()) for k in ks}
    )
    macro = per_label.drop(columns="n_trials").mean().to_frame("macro").T
    macro.insert(0, "n_trials", per_label["n_trials"].sum())
    return pd.concat([per_label, macro]).rename_axis("label").reset_index()
