"""KoLeo regulariser (Kozachenko-Leonenko entropy estimator; Sablayrolles et al., 2019,
"Spreading vectors for similarity search"), as used by DINOv2 on student CLS features.

Minimising -mean_i log(distance from sample i to its nearest neighbour) pushes the
L2-normalised features of a batch apart, spreading them uniformly over the sphere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """-mean log nearest-neighbour distance of L2-normalised features.

    Args:
        eps: floor on the distance (1e-8 as in DINOv2). Exact duplicates in a batch (the
            same scan drawn twice, or a collapsed student) would otherwise give log 0 and an
            undefined gradient; at the floor the loss is finite and the gradient zero.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) student CLS features of one global crop (B >= 2) -> scalar loss.

        DINOv2 applies it to each global crop separately, so crops of the same image are
        not each other's neighbours.
        """
        if features.shape[0] < 2:
            raise ValueError("KoLeo needs at least two samples to find a nearest neighbour")
        with torch.autocast(device_type=features.device.type, enabled=False):
            unit = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)  # (B, D)
            with torch.no_grad():
                # For unit vectors the nearest neighbour has the largest dot product.
                similarity = unit @ unit.t()  # (B, B)
                similarity.fill_diagonal_(float("-inf"))  # a sample is not its own neighbour
                neighbour = similarity.argmax(dim=1)  # (B,)
            # Distances from the difference, not from 2 - 2 * dot, which loses all precision
            # for near neighbours; the gradient flows through both ends of each pair.
            squared = (unit - unit[neighbour]).pow(2).sum(dim=-1)  # (B,)
            distance = squared.clamp_min(self.eps**2).sqrt()
            return -torch.log(distance).mean()
