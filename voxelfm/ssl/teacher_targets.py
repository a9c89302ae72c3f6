"""Teacher targets for self-distillation: teacher logits -> probability distributions.

A teacher that is only sharpened collapses onto a single prototype. Two remedies are
offered, chosen once per loss:

- ``"centring"`` (DINO; the VoxelFM default): subtract an exponential moving average of the
  mean teacher logit, then apply a low-temperature softmax.
- ``"sinkhorn"`` (SwAV; DINOv2's large models): Sinkhorn-Knopp equipartition of the batch,
  see :mod:`voxelfm.ssl.sinkhorn`. Stateless.

Centre update protocol, once per optimiser step (after any gradient accumulation):

1. every micro-batch calls the module on its teacher logits; the logits are centred with
   the current centre and recorded;
2. after the optimiser step, :meth:`TeacherTargets.update_centre` all-reduces the recorded
   sums and moves the centre towards the global mean of the step.

So step t is centred with statistics up to step t - 1, as in DINOv2, and the centre is the
same on every rank.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from voxelfm.ssl._distributed import all_reduce_sum_
from voxelfm.ssl.sinkhorn import sinkhorn_knopp

TeacherNormalisation = Literal["centring", "sinkhorn"]


class TeacherTargets(nn.Module):
    """Turns teacher logits into target distributions, by centring or by Sinkhorn-Knopp.

    Args:
        n_prototypes: K, the width of the head output.
        normalisation: ``"centring"`` or ``"sinkhorn"``.
        centre_momentum: EMA momentum of the centre (0.9 in DINO/DINOv2/VoxelFM).
        sinkhorn_iterations: rounds of Sinkhorn-Knopp (3 in DINOv2).
    """

    centre: torch.Tensor  # (1, K) EMA of the mean teacher logit
    centre_initialised: torch.Tensor  # () bool; False until the first update
    _pending_sum: torch.Tensor  # (K,) sum of teacher logits recorded since the last update
    _pending_count: torch.Tensor  # () number of teacher rows recorded since the last update

    def __init__(
        self,
        n_prototypes: int,
        normalisation: TeacherNormalisation = "centring",
        centre_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
    ):
        super().__init__()
        if normalisation not in ("centring", "sinkhorn"):
            raise ValueError(
                f"normalisation must be 'centring' or 'sinkhorn', got {normalisation!r}"
            )
        if not 0.0 <= centre_momentum < 1.0:
            raise ValueError(f"centre_momentum must be in [0, 1), got {centre_momentum}")
        self.normalisation = normalisation
        self.centre_momentum = centre_momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("centre", torch.zeros(1, n_prototypes))
        self.register_buffer("centre_initialised", torch.tensor(False))
        # Recorded statistics never outlive a step, so they stay out of checkpoints.
        self.register_buffer("_pending_sum", torch.zeros(n_prototypes), persistent=False)
        self.register_buffer("_pending_count", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Target distributions for (..., K) teacher logits; returns (..., K) float32.

        With centring, also records the logits for the next :meth:`update_centre`.
        """
        logits = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])  # (N, K)
        if self.normalisation == "sinkhorn":
            targets = sinkhorn_knopp(logits, temperature, self.sinkhorn_iterations)
        else:
            self._pending_sum += logits.sum(dim=0)
            self._pending_count += logits.shape[0]
            targets = F.softmax((logits - self.centre) / temperature, dim=-1)
        return targets.reshape(teacher_logits.shape)

    @torch.no_grad()
    def update_centre(self) -> None:
        """Move the centre towards the global mean of the logits recorded this step.

        A collective: every rank must call it, including ranks that recorded no rows.
        """
        if self.normalisation != "centring":
            return
        totals = all_reduce_sum_(torch.cat([self._pending_sum, self._pending_count[None]]))
        self._pending_sum.zero_()
        self._pending_count.zero_()
        n_rows = totals[-1]
        if n_rows.item() == 0:
            return  # e.g. no masked patch anywhere this step: keep the old centre
        batch_mean = totals[:-1] / n_rows  # (K,)
        # VoxelFM starts the EMA at the first batch mean: from a zero centre the first dozen
        # steps would be barely centred and the teacher could collapse early.
        momentum = self.centre_momentum if bool(self.centre_initialised) else 0.0
        self.centre.mul_(momentum).add_(batch_mean[None], alpha=1.0 - momentum)
        self.centre_initialised.fill_(True)
