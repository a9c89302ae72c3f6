"""DINO, iBOT and KoLeo losses, teacher centring and Sinkhorn-Knopp against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from voxelfm.ssl.losses.dino_clstoken_loss import DINOLoss
from voxelfm.ssl.losses.ibot_patch_loss import IBOTPatchLoss
from voxelfm.ssl.losses.koleo_loss import KoLeoLoss
from voxelfm.ssl.sinkhorn import sinkhorn_knopp
from voxelfm.ssl.teacher_targets import TeacherTargets


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_cross_entropy(target: np.ndarray, logits: np.ndarray) -> float:
    """-sum_k target_k log softmax(logits)_k for one distribution."""
    log_p = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
    return float(-(target * log_p).sum())


# --- DINO -------------------------------------------------------------------------------


def test_dino_uniform_student_costs_log_k():
    # A uniform student costs log K against any target distribution.
    n_prototypes = 5
    loss = DINOLoss(n_prototypes)
    teacher = torch.softmax(torch.randn(2, 3, n_prototypes), dim=-1)
    value = loss(torch.zeros(2, 3, n_prototypes), torch.zeros(4, 3, n_prototypes), teacher)
    assert value.item() == pytest.approx(math.log(n_prototypes), rel=1e-6)


@pytest.mark.parametrize("n_local", [0, 2])
def test_dino_matches_loop_over_cross_view_pairs(n_local):
    rng = np.random.default_rng(0)
    n_global, batch, n_prototypes, student_temp = 2, 3, 4, 0.1
    student_global = rng.normal(size=(n_global, batch, n_prototypes))
    student_local = rng.normal(size=(n_local, batch, n_prototypes))
    teacher = np_softmax(rng.normal(size=(n_global, batch, n_prototypes)) * 3)

    terms = []
    for student_views, is_global in ((student_global, True), (student_local, False)):
        for i, view in enumerate(student_views):
            for j in range(n_global):
                if is_global and i == j:
                    continue  # a view is never asked to predict itself
                ce = [np_cross_entropy(teacher[j, b], view[b] / student_temp) for b in range(batch)]
                terms.append(np.mean(ce))
    assert len(terms) == n_global * (n_global - 1) + n_local * n_global
    expected = np.mean(terms)

    value = DINOLoss(n_prototypes, student_temp=student_temp)(
        torch.tensor(student_global),
        torch.tensor(student_local) if n_local else None,
        torch.tensor(teacher),
    )
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_dino_without_cross_view_pair_is_an_error():
    with pytest.raises(ValueError, match="no cross-view pair"):
        DINOLoss(3)(torch.zeros(1, 2, 3), None, torch.full((1, 2, 3), 1 / 3))


# --- teacher centring ---------------------------------------------------------------------


def test_centring_softmax_and_ema_update():
    n_prototypes, temp = 3, 0.05
    targets = TeacherTargets(n_prototypes, "centring", centre_momentum=0.9)
    first = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 6.0]])

    # Before any update the centre is zero: a plain sharpened softmax.
    np.testing.assert_allclose(
        targets(first, temp).numpy(), np_softmax(first.numpy() / temp), rtol=1e-5, atol=1e-12
    )
    targets.update_centre()
    # The first update adopts the batch mean outright (VoxelFM), with no momentum.
    np.testing.assert_allclose(targets.centre.numpy(), [[4 / 3, 4 / 3, 10 / 3]], rtol=1e-6)

    # Two micro-batches in one step count as one batch of their union.
    part_a = torch.tensor([[0.0, 3.0, 0.0]])
    part_b = torch.tensor([[6.0, 0.0, 0.0], [0.0, 3.0, 3.0]])
    centred = targets(part_a, temp)
    np.testing.assert_allclose(
        centred.numpy(),
        np_softmax((part_a.numpy() - [4 / 3, 4 / 3, 10 / 3]) / temp),
        rtol=1e-5,
        atol=1e-12,
    )
    targets(part_b, temp)
    targets.update_centre()
    union_mean = np.array([2.0, 2.0, 1.0])
    expected = 0.9 * np.array([4 / 3, 4 / 3, 10 / 3]) + 0.1 * union_mean
    np.testing.assert_allclose(targets.centre.numpy()[0], expected, rtol=1e-6)


def test_centre_is_checkpointed_but_pending_sums_are_not():
    keys = set(TeacherTargets(4).state_dict())
    assert keys == {"centre", "centre_initialised"}


def test_step_without_teacher_rows_keeps_the_centre():
    targets = TeacherTargets(2)
    targets(torch.tensor([[1.0, 3.0]]), 0.1)
    targets.update_centre()
    targets.update_centre()  # e.g. an iBOT step in which no patch was masked
    np.testing.assert_allclose(targets.centre.numpy(), [[1.0, 3.0]])


def test_dino_loss_records_its_teacher_for_the_centre():
    loss = DINOLoss(2)
    loss.teacher_probabilities(torch.tensor([[[0.0, 2.0]], [[2.0, 4.0]]]), teacher_temp=0.1)
    loss.update_centre()
    np.testing.assert_allclose(loss.teacher_targets.centre.numpy(), [[1.0, 3.0]])


# --- Sinkhorn-Knopp -----------------------------------------------------------------------


def np_sinkhorn_dinov2(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    """DINOv2's formulation: masses 1/K per prototype and 1/B per sample, then x B."""
    q = np.exp(logits / temp).T  # (K, B)
    n_prototypes, batch = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(axis=1, keepdims=True) / n_prototypes
        q = q / q.sum(axis=0, keepdims=True) / batch
    return (q * batch).T


def test_sinkhorn_matches_dinov2_formulation():
    logits = np.random.default_rng(1).normal(size=(6, 4)) * 0.5
    result = sinkhorn_knopp(torch.tensor(logits, dtype=torch.float32), 0.1, n_iterations=3)
    np.testing.assert_allclose(result.numpy(), np_sinkhorn_dinov2(logits, 0.1, 3), rtol=1e-4)


def test_sinkhorn_is_doubly_normalised():
    batch, n_prototypes = 32, 8
    logits = torch.randn(batch, n_prototypes, generator=torch.Generator().manual_seed(0))
    # Three rounds (DINOv2's setting) only approach equipartition; fifty reach it.
    for n_iterations, tolerance in ((3, 0.2), (50, 1e-4)):
        q = sinkhorn_knopp(logits, temperature=0.5, n_iterations=n_iterations)
        # Each sample's assignment is a distribution, exactly.
        torch.testing.assert_close(q.sum(dim=1), torch.ones(batch))
        # The batch is spread evenly over the prototypes, up to convergence.
        prototype_mass = q.sum(dim=0) / (batch / n_prototypes)
        assert torch.all((prototype_mass - 1).abs() < tolerance), prototype_mass


def test_sinkhorn_survives_logits_that_overflow_exp():
    q = sinkhorn_knopp(torch.tensor([[10.0, -10.0], [-10.0, 10.0]]), temperature=0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q, torch.eye(2), atol=1e-6, rtol=0)


def test_sinkhorn_teacher_keeps_no_centre():
    loss = DINOLoss(4, teacher_normalisation="sinkhorn")
    probs = loss.teacher_probabilities(torch.randn(2, 8, 4), teacher_temp=0.07)
    assert probs.shape == (2, 8, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 8))
    loss.update_centre()
    assert not loss.teacher_targets.centre.any()


# --- iBOT ---------------------------------------------------------------------------------


def test_ibot_weights_each_image_by_its_masked_patch_count():
    rng = np.random.default_rng(2)
    student_temp, n_prototypes = 0.1, 3
    masks = np.array(
        [
            [True, False, False, False],  # 1 masked patch
            [False, True, True, False],  # 2 masked patches
            [False, False, False, False],  # unmasked: contributes 0 but counts as an image
        ]
    )
    n_masked = int(masks.sum())
    student = rng.normal(size=(n_masked, n_prototypes))
    teacher = np_softmax(rng.normal(size=(n_masked, n_prototypes)))

    ce = [np_cross_entropy(teacher[m], student[m] / student_temp) for m in range(n_masked)]
    expected = (ce[0] / 1 + (ce[1] + ce[2]) / 2 + 0.0) / 3

    value = IBOTPatchLoss(n_prototypes, student_temp=student_temp)(
        torch.tensor(student), torch.tensor(teacher), torch.tensor(masks)
    )
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_rejects_tokens_that_do_not_match_the_masks():
    masks = torch.tensor([[True, True, False]])
    with pytest.raises(ValueError, match="masked tokens"):
        IBOTPatchLoss(2)(torch.zeros(1, 2), torch.full((1, 2), 0.5), masks)


# --- KoLeo --------------------------------------------------------------------------------


def test_koleo_on_points_of_the_unit_circle():
    # Points at 0, 60 and 180 degrees (scaled by 5: the loss normalises first).
    angles = np.radians([0.0, 60.0, 180.0])
    points = 5 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    # Nearest-neighbour chords: 0 <-> 60 at 2 sin(30) = 1 for both, 180 -> 60 at 2 sin(60).
    expected = -(math.log(1.0) + math.log(1.0) + math.log(math.sqrt(3))) / 3
    value = KoLeoLoss()(torch.tensor(points, dtype=torch.float32))
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_koleo_with_exact_duplicates_is_finite():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    value = KoLeoLoss(eps=1e-8)(features)
    # Every sample has a duplicate: all distances sit at the eps floor.
    assert value.item() == pytest.approx(-math.log(1e-8), rel=1e-5)
    value.backward()
    assert torch.isfinite(features.grad).all()


def test_koleo_gradient_spreads_close_points_apart():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]], requires_grad=True)
    KoLeoLoss()(features).backward()
    # Descending the loss moves the second point away from the first (larger angle).
    assert features.grad[1, 1] < 0
