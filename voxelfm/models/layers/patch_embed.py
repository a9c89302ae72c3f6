"""Voxel patch embedding: one strided Conv3d turns a CT crop into a token sequence."""

from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed3D(nn.Module):
    """Split a single-channel volume into non-overlapping cubic patches and project each one.

    Token order is C order over the patch grid: for a crop of shape (X, Y, Z) the token of
    patch (i, j, k) sits at index ``(i * gy + j) * gz + k``, so the last spatial axis varies
    fastest. Later stages rely on this to map tokens back to voxel / world coordinates.
    """

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv3d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """(B, 1, X, Y, Z) -> tokens (B, gx*gy*gz, D) and the patch grid (gx, gy, gz)."""
        patches = self.proj(x)  # (B, D, gx, gy, gz)
        gx, gy, gz = patches.shape[2:]
        tokens = patches.flatten(2).transpose(1, 2)  # (B, gx*gy*gz, D), z fastest
        return tokens, (gx, gy, gz)
