"""3D block masking: exact counts, box shapes, per-batch mask statistics, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from voxelfm.ssl.masking import BlockMaskGenerator3D, sample_batch_masks

GRID = (8, 8, 8)  # a 112^3 global crop with 14^3 patches


def test_mask_holds_exactly_the_requested_count():
    generator = BlockMaskGenerator3D(GRID)
    rng = np.random.default_rng(0)
    for n_masked in (0, 1, 51, 256, 512):
        mask = generator(n_masked, rng)
        assert mask.shape == GRID and mask.dtype == bool
        assert mask.sum() == n_masked


def test_blocks_are_boxes_within_the_shape_bounds():
    generator = BlockMaskGenerator3D(GRID, min_block_patches=4, min_aspect=0.3)
    rng = np.random.default_rng(1)
    n_boxes, covered = 0, []
    for _ in range(50):
        n_masked = int(rng.integers(20, 257))
        mask, boxes = generator.place_blocks(n_masked, rng)
        assert 0 < mask.sum() <= n_masked  # never more than requested
        union = np.zeros(GRID, dtype=bool)
        for box in boxes:
            x, y, z = box.size
            assert 0.3 <= x / z <= 1 / 0.3 and 0.3 <= y / z <= 1 / 0.3
            assert x * y * z <= generator.max_block_patches
            assert all(s >= 0 and s + n <= g for s, n, g in zip(box.start, box.size, GRID))
            union[box.slices] = True
        np.testing.assert_array_equal(mask, union)  # nothing but boxes
        n_boxes += len(boxes)
        covered.append(mask.sum() / n_masked)
    assert n_boxes > 50
    # Masks are block masks: random single patches only top up a small shortfall.
    assert np.mean(covered) > 0.9


def test_batch_masks_respect_probability_and_ratio_range():
    generator = BlockMaskGenerator3D(GRID)
    n_patches = generator.n_patches
    rng = np.random.default_rng(2)
    ratios = []
    for _ in range(40):
        masks = sample_batch_masks(8, generator, 0.5, (0.1, 0.5), rng)
        assert masks.shape == (8, n_patches)
        counts = masks.sum(dim=1).numpy()
        assert (counts > 0).sum() == 4  # int(8 * 0.5) crops are masked
        masked = counts[counts > 0] / n_patches
        # int() truncation can land at most one patch below the range.
        assert masked.min() >= 0.1 - 1 / n_patches and masked.max() <= 0.5
        # Stratified: the k-th smallest count lies in the k-th quarter of the range.
        edges = np.floor(np.linspace(0.1, 0.5, 5) * n_patches)
        sorted_counts = np.sort(counts[counts > 0])
        assert np.all(edges[:-1] <= sorted_counts) and np.all(sorted_counts <= edges[1:])
        ratios.extend(masked)
    assert np.mean(ratios) == pytest.approx(0.3, abs=0.01)


def test_masked_crops_are_shuffled_over_the_batch():
    generator = BlockMaskGenerator3D(GRID)
    rng = np.random.default_rng(3)
    masked_positions = set()
    for _ in range(20):
        counts = sample_batch_masks(4, generator, 0.5, (0.1, 0.5), rng).sum(dim=1)
        masked_positions.update(np.flatnonzero(counts.numpy()).tolist())
    assert masked_positions == {0, 1, 2, 3}


def test_masks_are_a_function_of_the_seed():
    generator = BlockMaskGenerator3D(GRID)

    def draw(seed):
        return sample_batch_masks(6, generator, 0.5, (0.1, 0.5), np.random.default_rng(seed))

    assert (draw(7) == draw(7)).all()
    assert not (draw(7) == draw(8)).all()
