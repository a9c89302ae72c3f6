"""3D block masking for iBOT: which patch tokens of a global crop the student sees as the
mask token.

Masks are unions of random boxes (a 3D version of BEiT/DINOv2's block masking), because
masking isolated patches of a CT volume is too easy: their neighbours nearly give them away.
As in VoxelFM, any shortfall after block placement is topped up with random single patches,
so a mask holds exactly the number of patches requested.

All randomness comes from a ``numpy.random.Generator`` passed in, so masks are a function of
its seed (exact resume, reproducible data loading).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

GridSize = tuple[int, int, int]


@dataclass(frozen=True)
class Box:
    """An axis-aligned block of patches: ``start`` corner and ``size`` along (x, y, z)."""

    start: GridSize
    size: GridSize

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.size))  # type: ignore[return-value]


class BlockMaskGenerator3D:
    """Masks of a requested number of patches on a (gx, gy, gz) patch grid, built from boxes.

    A box is drawn with a volume uniform in [``min_block_patches``, remaining budget capped at
    ``max_block_patches``] and the side ratios x/z and y/z log-uniform in
    [``min_aspect``, ``max_aspect``] (VoxelFM's parametrisation); a box that falls outside the
    grid, outside the ratio bounds after rounding, or that would overshoot the budget is
    redrawn, up to ``max_attempts`` times per box.

    Args:
        grid_size: patch grid (gx, gy, gz) of a global crop.
        min_block_patches: smallest box volume (4).
        max_block_patches: largest box volume; half the grid by default (VoxelFM).
        min_aspect: smallest side ratio (0.3).
        max_aspect: largest side ratio; ``1 / min_aspect`` by default.
        max_attempts: draws per box before block placement gives up (10).
    """

    def __init__(
        self,
        grid_size: GridSize,
        min_block_patches: int = 4,
        max_block_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
    ):
        if len(grid_size) != 3 or min(grid_size) < 1:
            raise ValueError(f"grid_size must be three positive ints, got {grid_size}")
        self.grid_size = tuple(int(n) for n in grid_size)
        self.n_patches = math.prod(self.grid_size)
        self.min_block_patches = min_block_patches
        self.max_block_patches = (
            self.n_patches // 2 if max_block_patches is None else max_block_patches
        )
        self.min_aspect = min_aspect
        self.max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not 0 < self.min_aspect <= 1.0 <= self.max_aspect:
            raise ValueError("aspect bounds must satisfy 0 < min_aspect <= 1 <= max_aspect")
        self.max_attempts = max_attempts

    def __call__(self, n_masked: int, rng: np.random.Generator) -> np.ndarray:
        """A (gx, gy, gz) bool mask with exactly ``n_masked`` True patches."""
        mask, _ = self.place_blocks(n_masked, rng)
        shortfall = n_masked - int(mask.sum())
        if shortfall > 0:
            free = np.flatnonzero(~mask)
            mask.flat[rng.choice(free, size=shortfall, replace=False)] = True
        return mask

    def place_blocks(self, n_masked: int, rng: np.random.Generator) -> tuple[np.ndarray, list[Box]]:
        """Block placement alone: a mask of at most ``n_masked`` patches and its boxes."""
        if not 0 <= n_masked <= self.n_patches:
            raise ValueError(f"cannot mask {n_masked} of {self.n_patches} patches")
        mask = np.zeros(self.grid_size, dtype=bool)
        boxes: list[Box] = []
        n_placed = 0
        while n_placed < n_masked:
            budget = min(n_masked - n_placed, self.max_block_patches)
            box = self._draw_box(mask, budget, rng)
            if box is None:
                break
            n_placed += int(np.count_nonzero(~mask[box.slices]))
            mask[box.slices] = True
            boxes.append(box)
        return mask, boxes

    def _draw_box(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> Box | None:
        """A box that masks between 1 and ``budget`` new patches, or None after all attempts."""
        log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))
        for _ in range(self.max_attempts):
            volume = rng.uniform(min(self.min_block_patches, budget), budget)
            ratio_x, ratio_y = np.exp(rng.uniform(*log_aspect, size=2))
            side_z = round((volume / (ratio_x * ratio_y)) ** (1 / 3))
            size = (round(side_z * ratio_x), round(side_z * ratio_y), side_z)
            if min(size) < 1 or any(n > g for n, g in zip(size, self.grid_size)):
                continue
            # Rounding small sides can push a ratio past its bound (z = 2, ratio 3.3 -> x = 7).
            if not all(self.min_aspect <= n / side_z <= self.max_aspect for n in size[:2]):
                continue
            start = tuple(int(rng.integers(0, g - n + 1)) for n, g in zip(size, self.grid_size))
            box = Box(start=start, size=size)  # type: ignore[arg-type]
            newly_masked = int(np.count_nonzero(~mask[box.slices]))
            if 0 < newly_masked <= budget:
                return box
        return None


def sample_batch_masks(
    n_images: int,
    generator: BlockMaskGenerator3D,
    mask_probability: float,
    ratio_range: tuple[float, float],
    rng: np.random.Generator,
) -> torch.Tensor:
    """iBOT masks for all global crops of a batch, as DINOv2's ``collate_data_and_cast``.

    ``int(n_images * mask_probability)`` crops are masked. Their ratios are stratified over
    ``ratio_range``: the range is cut into that many equal bins and crop i draws uniformly
    in bin i, so every batch covers light and heavy masking evenly. The masks are then
    shuffled over the crops.

    Args:
        n_images: global crops in the batch (2 x images per batch).
        generator: mask generator for the crops' patch grid.
        mask_probability: fraction of crops that are masked (0.5).
        ratio_range: (min, max) fraction of patches masked in a masked crop ((0.1, 0.5)).
        rng: source of all randomness.

    Returns:
        (n_images, gx * gy * gz) bool, True = masked, patches in row-major (x, y, z) order
        (that of ``Conv3d`` patch-embedding output ``.flatten(2)``).
    """
    ratio_min, ratio_max = ratio_range
    if not 0.0 <= ratio_min <= ratio_max <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= min <= max <= 1, got {ratio_range}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    n_masked_images = int(n_images * mask_probability)
    bin_edges = np.linspace(ratio_min, ratio_max, n_masked_images + 1)
    masks = np.zeros((n_images, generator.n_patches), dtype=bool)
    for i in range(n_masked_images):
        ratio = rng.uniform(bin_edges[i], bin_edges[i + 1])
        masks[i] = generator(int(generator.n_patches * ratio), rng).reshape(-1)
    return torch.from_numpy(masks[rng.permutation(n_images)])
