"""The transformer feed-forward layer."""

from __future__ import annotations

from torch import Tensor, nn


class Mlp(nn.Module):
    """Linear -> GELU (exact, not tanh) -> Linear, as in dinov2 and the VoxelFM reference."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D)."""
        return self.fc2(self.act(self.fc1(x)))
