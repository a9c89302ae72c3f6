"""Stochastic depth: drop a whole residual branch for randomly chosen samples."""

from __future__ import annotations

from torch import Tensor, nn


class DropPath(nn.Module):
    """Zero the residual branch of each sample with probability ``drop_prob`` while training.

    Kept samples are rescaled by ``1 / (1 - drop_prob)`` so the expected branch output is
    unchanged and evaluation (where nothing is dropped) needs no correction.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        """(B, ...) -> (B, ...); the identity in eval mode or when drop_prob is 0."""
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
