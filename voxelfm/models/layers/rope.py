"""3D rotary position embedding (RoPE) over the patch grid, as in the VoxelFM reference.

Positions are the patch centres normalised to [-1, 1] along each axis of the crop, so a
crop of any size (and shape) covers the same coordinate range and no interpolation is ever
needed. Each attention head's channels are split into three equal contiguous blocks, one
per grid axis (axis 0, 1, 2 of the input volume, in that order). Inside a block, channels
(2p, 2p + 1) form the p-th rotation pair ("interleaved" pairing, not the half-split pairing
of GPT-NeoX), rotated by the angle ``2 * pi * coord / period_p`` with

    period_p = base ** (2p / (head_dim / 3)),   p = 0 .. head_dim / 6 - 1.

Because q and k at positions a and b are rotated by angles linear in a and b, their dot
product depends only on the offset a - b: attention is translation invariant in the
normalised coordinates. Everything here runs in float32, also under bf16 autocast, because
bf16 angles lose the fine position differences between neighbouring patches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class RopePositionEmbedding3D(nn.Module):
    """Produce the per-token sin/cos tables that :func:`apply_rope` rotates q and k with."""

    periods: Tensor

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float = 100.0,
        rescale_coords: float | None = None,
    ) -> None:
        """
        Args:
            embed_dim: model width; ``embed_dim / num_heads`` must be divisible by 6 (three
                axes, each needing an even number of channels).
            num_heads: attention heads.
            base: sets the longest period (just under ``base``) of each axis's pairs, in
                normalised-coordinate units where a crop spans 2; the shortest is 1.
            rescale_coords: if set, training-mode forwards multiply all coordinates by one
                random factor in [1 / rescale_coords, rescale_coords] (log-uniform), a
                scale augmentation from dinov3. ``None`` (the published setting) disables it.
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        head_dim = embed_dim // num_heads
        if head_dim % 6 != 0:
            raise ValueError(
                f"3D RoPE needs head_dim divisible by 6 (3 axes x rotation pairs); "
                f"embed_dim={embed_dim} / num_heads={num_heads} gives head_dim={head_dim}"
            )
        if rescale_coords is not None and rescale_coords < 1.0:
            raise ValueError(f"rescale_coords must be >= 1 or None, got {rescale_coords}")
        self.head_dim = head_dim
        self.base = base
        self.rescale_coords = rescale_coords
        # Persistent on purpose: the reference checkpoints carry this buffer, so strict loading
        # of published weights needs the key.
        self.register_buffer("periods", rope_periods(head_dim, base))  # (head_dim/6,)

    def forward(self, grid_size: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """sin and cos tables, each (gx*gy*gz, head_dim) float32, in patch-token order."""
        coords = patch_grid_coordinates(grid_size, device=self.periods.device)
        if self.training and self.rescale_coords is not None:
            log_max = math.log(self.rescale_coords)
            scale = torch.empty((), device=coords.device).uniform_(-log_max, log_max).exp()
            coords = coords * scale
        return self.sin_cos_for_coordinates(coords)

    def sin_cos_for_coordinates(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 3) coordinates -> sin, cos (N, head_dim) float32, laid out as apply_rope expects."""
        periods = self.periods.float()
        angles = (2.0 * math.pi) * coords.float()[:, :, None] / periods  # (N, 3, head_dim/6)
        # Both channels of a pair share one angle; the three axis blocks sit one after another.
        angles = angles.repeat_interleave(2, dim=-1).flatten(1)  # (N, head_dim)
        return angles.sin(), angles.cos()


def rope_periods(head_dim: int, base: float) -> Tensor:
    """period_p = base ** (2p / (head_dim / 3)) for p < head_dim / 6, float32."""
    exponents = 2.0 * torch.arange(head_dim // 6, dtype=torch.float32) / (head_dim // 3)
    return base**exponents


def patch_grid_coordinates(
    grid_size: tuple[int, int, int], device: torch.device | str | None = None
) -> Tensor:
    """Patch centres of a (gx, gy, gz) grid in [-1, 1]: (gx*gy*gz, 3) float32, last axis fastest."""
    axes = [
        2.0 * (torch.arange(0.5, n, dtype=torch.float32, device=device) / n) - 1.0
        for n in grid_size
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate each channel pair (2p, 2p+1) of x by the tabulated angle.

    Args:
        x: (..., N, head_dim) queries or keys of the patch tokens only.
        sin, cos: (N, head_dim) from :class:`RopePositionEmbedding3D`.

    Returns:
        x rotated, same shape and dtype as x (the arithmetic itself is float32).
    """
    x32 = x.float()
    even, odd = x32.unflatten(-1, (-1, 2)).unbind(-1)  # (..., N, head_dim/2) each
    # Multiplying the pair (even, odd) by i gives (-odd, even); rotation = x cos + (i x) sin.
    x_times_i = torch.stack((-odd, even), dim=-1).flatten(-2)
    return (x32 * cos + x_times_i * sin).to(x.dtype)
