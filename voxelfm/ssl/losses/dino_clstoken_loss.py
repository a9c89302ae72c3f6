"""DINO loss on the CLS token: the student's view of a crop must predict the teacher's view
of the other global crops.

Pairs follow DINOv2 (and VoxelFM, which swaps the two teacher global crops to the same end):
every student crop, global or local, is matched with every teacher global crop except the
one showing the same view. The loss is the mean cross-entropy over those
``G * (G - 1) + L * G`` pairs and over the batch (G global crops, L local crops), i.e.
DINOv2's global and local terms, each divided by the total number of pairs, added up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voxelfm.ssl.teacher_targets import TeacherNormalisation, TeacherTargets


class DINOLoss(nn.Module):
    """Cross-entropy between teacher and student CLS prototype distributions.

    Args:
        n_prototypes: K, the DINO head output width (65,536 in VoxelFM).
        student_temp: student softmax temperature (0.1).
        teacher_normalisation: ``"centring"`` (VoxelFM) or ``"sinkhorn"``.
        centre_momentum: EMA momentum of the teacher centre (0.9).
        sinkhorn_iterations: Sinkhorn-Knopp rounds (3).
    """

    def __init__(
        self,
        n_prototypes: int,
        student_temp: float = 0.1,
        teacher_normalisation: TeacherNormalisation = "centring",
        centre_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.teacher_targets = TeacherTargets(
            n_prototypes, teacher_normalisation, centre_momentum, sinkhorn_iterations
        )

    def teacher_probabilities(
        self, teacher_logits: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """(G, B, K) teacher CLS logits -> (G, B, K) targets; records them for the centre."""
        return self.teacher_targets(teacher_logits, teacher_temp)

    def update_centre(self) -> None:
        """Once per optimiser step, on every rank: see :class:`TeacherTargets`."""
        self.teacher_targets.update_centre()

    def forward(
        self,
        student_global_logits: torch.Tensor,
        student_local_logits: torch.Tensor | None,
        teacher_probs: torch.Tensor,
    ) -> torch.Tensor:
        """Mean cross-entropy over all cross-view (student crop, teacher global crop) pairs.

        Args:
            student_global_logits: (G, B, K), crop g of image b at [g, b].
            student_local_logits: (L, B, K), or None / L = 0 without local crops.
            teacher_probs: (G, B, K) from :meth:`teacher_probabilities`, same crop order.

        Returns:
            Scalar loss.
        """
        n_global, batch_size, _ = teacher_probs.shape
        if student_global_logits.shape != teacher_probs.shape:
            raise ValueError(
                f"student global logits {tuple(student_global_logits.shape)} and teacher "
                f"probabilities {tuple(teacher_probs.shape)} must both be (G, B, K)"
            )
        n_local = 0 if student_local_logits is None else student_local_logits.shape[0]
        n_pairs = n_global * (n_global - 1) + n_local * n_global
        if n_pairs == 0:
            raise ValueError("one global crop and no local crop leave no cross-view pair")

        teacher_probs = teacher_probs.float()
        # Summing the targets over teacher views turns the pair loop into one product per
        # student crop: sum_j CE(s_i, t_j) = CE(s_i, sum_j t_j) since CE is linear in t.
        teacher_sum = teacher_probs.sum(dim=0)  # (B, K)

        log_p_global = F.log_softmax(student_global_logits.float() / self.student_temp, dim=-1)
        # Each global view is compared with every teacher view except its own.
        cross_entropy = -torch.einsum("gbk,gbk->", log_p_global, teacher_sum - teacher_probs)
        if n_local:
            log_p_local = F.log_softmax(student_local_logits.float() / self.student_temp, dim=-1)
            if log_p_local.shape[1:] != teacher_sum.shape:
                raise ValueError(
                    f"student local logits {tuple(student_local_logits.shape)} must be "
                    f"(L, {batch_size}, K) to match the teacher"
                )
            cross_entropy = cross_entropy - torch.einsum("lbk,bk->", log_p_local, teacher_sum)
        return cross_entropy / (n_pairs * batch_size)
