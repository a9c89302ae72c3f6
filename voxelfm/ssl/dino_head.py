"""Projection head shared by the DINO (CLS) and iBOT (patch) objectives.

MLP -> L2 normalisation -> weight-normalised linear layer onto the prototypes, as in DINO.
The last layer's weight is ``g * v / ||v||`` row by row. The gain ``g`` starts at 1 and, as in
the VoxelFM reference (``head_weight_norm_gain_trainable``), is trained by default: it sits in
the optimiser's last-layer group (weight-decayed, frozen during the first epoch like the
prototypes). With ``trainable_gain=False`` (DINO's ``norm_last_layer``) it stays at 1, every
prototype is a unit vector and a logit is the cosine similarity between the bottleneck
feature and that prototype.

State-dict keys match the published VoxelFM checkpoints (``dino_head.*`` / ``ibot_head.*``
hold ``mlp.{0,2,4}.weight|bias`` and ``last_layer.parametrizations.weight.original0|1``).
Checkpoints written with the older ``torch.nn.utils.weight_norm`` (original DINOv2: keys
``last_layer.weight_g|weight_v``) load too: torch's parametrised weight norm converts those
keys itself when a state dict is loaded.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP projection head with weight-normalised prototypes.

    Args:
        in_dim: backbone embedding width.
        n_prototypes: output width K (65,536 in VoxelFM).
        n_layers: linear layers in the MLP before the bottleneck (3).
        hidden_dim: width of the hidden MLP layers (2048).
        bottleneck_dim: width of the normalised bottleneck (256).
        trainable_gain: train the weight-norm gain of the prototype layer (the reference's
            default); False freezes it at 1 so logits stay cosines in [-1, 1].
    """

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int,
        n_layers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        trainable_gain: bool = True,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        widths = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(pairwise(widths)):
            if i > 0:
                layers.append(nn.GELU())
            layers.append(nn.Linear(width_in, width_out))
        # A Sequential even for one layer, so the keys are mlp.0.* in every configuration.
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, n_prototypes, bias=False))
        gain = self.last_layer.parametrizations.weight.original0  # (K, 1), DINO's weight_g
        gain.data.fill_(1.0)
        # A trainable gain lets each prototype scale its logits beyond the cosine's [-1, 1],
        # which the teacher temperature otherwise has to do alone; DINO froze it for stability.
        gain.requires_grad_(trainable_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) features -> (..., n_prototypes) logits."""
        x = self.mlp(x)
        # float16 cannot represent 1e-12; its smallest safe floor is ~1e-6.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = nn.functional.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x)
