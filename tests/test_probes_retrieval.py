"""Retrieval: full-gallery ranks and the paper's 1-positive-among-99-negatives protocol."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import hypergeom
from sklearn.metrics import average_precision_score
from sklearn.metrics.pairwise import cosine_similarity

from voxelfm.errors import VoxelFMError
from voxelfm.probes.retrieval import (
    instance_gallery_ranks,
    instance_pool_trials,
    label_pool_trials,
    label_recall_summary,
    rank_among_random_negatives,
    recall_at_k,
)


def _unit_vectors(degrees):
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_gallery_ranks_on_a_hand_built_case():
    # Patient A at 0 and 10 degrees, B at 30 and 100, C (one scan, never a query) at 55.
    X = _unit_vectors([0, 10, 30, 100, 55])
    patients = ["A", "A", "B", "B", "C"]
    ranks = instance_gallery_ranks(X, patients)
    assert ranks["query"].tolist() == [0, 1, 2, 3]
    # From 30: A@10 (20 deg), C (25), A@0 (30), then B@100 (70) -> rank 4; from 100: C, B@30.
    assert ranks["first_positive_rank"].tolist() == [1, 1, 4, 2]
    assert ranks["average_precision"].tolist() == pytest.approx([1, 1, 1 / 4, 1 / 2])
    assert recall_at_k(ranks["first_positive_rank"], ks=(1, 5)) == {
        "recall@1": 0.5,
        "recall@5": 1.0,
    }


def test_gallery_average_precision_matches_sklearn_per_query():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(30), rng.integers(1, 4, 30))
    X = rng.normal(size=(len(patients), 8)) + 0.8 * rng.normal(size=(30, 8))[patients]
    ranks = instance_gallery_ranks(X, patients)
    similarity = cosine_similarity(X)
    for query, ap in zip(ranks["query"], ranks["average_precision"]):
        others = np.arange(len(X)) != query
        expected = average_precision_score(
            patients[others] == patients[query], similarity[query, others]
        )
        assert ap == pytest.approx(expected)


def _patients_with_scans(n_patients, scans_per_patient, dim, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_patients, dim))
    patients = np.repeat(np.arange(n_patients), scans_per_patient)
    return centres[patients] + spread * rng.normal(size=(len(patients), dim)), patients


def test_pool_protocol_is_perfect_on_separable_patients():
    X, patients = _patients_with_scans(150, 2, 64, spread=0.01, seed=0)
    trials = instance_pool_trials(X, patients, seed=0)
    assert len(trials) == 300  # every ordered pair of a patient's two scans
    assert recall_at_k(trials["rank"]) == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0}


def test_pool_protocol_is_at_chance_on_random_features():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(400), 3)
    trials = instance_pool_trials(rng.normal(size=(1200, 32)), patients, seed=0)
    recall = recall_at_k(trials["rank"])
    assert recall["recall@1"] == pytest.approx(0.01, abs=0.008)
    assert recall["recall@5"] == pytest.approx(0.05, abs=0.015)
    assert recall["recall@10"] == pytest.approx(0.10, abs=0.02)


def test_collapsed_embeddings_score_chance_not_perfect():
    """All ties: the reference's positive-first stable sort would give Recall@1 = 1."""
    patients = np.repeat(np.arange(300), 2)
    trials = instance_pool_trials(np.ones((600, 4)), patients, seed=0)
    assert recall_at_k(trials["rank"], ks=(1, 10)) == pytest.approx(
        {"recall@1": 0.01, "recall@10": 0.10}, abs=0.025
    )


def test_hypergeometric_ranking_equals_drawing_the_pool():
    """Compare with the reference procedure: draw 99 negatives, sort the pool of 100."""
    rng = np.random.default_rng(2)
    similarities = rng.normal(size=400)
    positive, negatives = np.array([0]), np.arange(1, 400)
    n_above = int((similarities[negatives] > similarities[0]).sum())
    exact = {k: hypergeom(len(negatives), n_above, 99).cdf(k - 1) for k in (1, 5, 10)}

    def reference_rank(draw_rng):
        pool = np.concatenate([positive, draw_rng.choice(negatives, 99, replace=False)])
        return int(np.flatnonzero(np.argsort(-similarities[pool], kind="stable") == 0)[0]) + 1

    draw_rng = np.random.default_rng(3)
    reference = np.array([reference_rank(draw_rng) for _ in range(3000)])
    ours = np.concatenate(
        [
            rank_among_random_negatives(similarities, positive, negatives, 99, draw_rng)
            for _ in range(3000)
        ]
    )
    for k, probability in exact.items():
        tolerance = 4 * np.sqrt(probability * (1 - probability) / 3000) + 1e-9
        assert (reference <= k).mean() == pytest.approx(probability, abs=tolerance)
        assert (ours <= k).mean() == pytest.approx(probability, abs=tolerance)


def test_pool_needs_enough_negatives_and_is_seeded():
    X, patients = _patients_with_scans(40, 2, 8, spread=1.0, seed=0)
    with pytest.raises(VoxelFMError, match="99 negatives"):
        instance_pool_trials(X, patients)  # only 78 scans of other patients
    first = instance_pool_trials(X, patients, n_negatives=50, seed=7)
    again = instance_pool_trials(X, patients, n_negatives=50, seed=7)
    np.testing.assert_array_equal(first["rank"], again["rank"])


def test_label_retrieval_trials_and_macro_average():
    rng = np.random.default_rng(0)
    n = 300
    labels = np.zeros((n, 2), dtype=int)
    labels[:40, 0] = 1  # label "a": 40 scans clustered together
    labels[200:230, 1] = 1  # label "b": 30 scans, random
    X = rng.normal(size=(n, 16))
    X[:40] = rng.normal(size=16) + 0.01 * rng.normal(size=(40, 16))
    trials = label_pool_trials(X, labels, label_names=["a", "b"], seed=0)
    assert trials.groupby("label").size().to_dict() == {"a": 40 * 39, "b": 30 * 29}
    summary = label_recall_summary(trials, ks=(1, 10)).set_index("label")
    assert summary.loc["a", "recall@1"] == 1.0
    assert summary.loc["b", "recall@10"] == pytest.approx(0.1, abs=0.04)
    assert summary.loc["macro", "recall@10"] == pytest.approx(
        summary.loc[["a", "b"], "recall@10"].mean()
    )
    assert summary.loc["macro", "n_trials"] == len(trials)
