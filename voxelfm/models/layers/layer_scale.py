"""LayerScale (CaiT): a learnable per-channel gain on each residual branch."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """Multiply by a per-channel ``gamma`` initialised to a small value.

    Starting each residual branch near zero lets a deep ViT begin close to the identity,
    which stabilises self-distillation in its first iterations. The parameter is named
    ``gamma`` because that is the key in dinov2 / VoxelFM checkpoints.
    """

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma
