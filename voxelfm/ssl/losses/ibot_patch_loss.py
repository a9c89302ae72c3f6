"""iBOT loss on masked patch tokens: the student, seeing a global crop with some patches
replaced by the mask token, must predict the teacher's prototype distribution for each
hidden patch, the teacher having seen the crop unmasked.

Each image weighs the same whatever its mask ratio (DINOv2's ``forward_masked``): a patch's
cross-entropy is weighted by 1 / (masked patches in its image) and the sum is divided by
the number of images, masked or not, so an unmasked image contributes zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voxelfm.ssl.teacher_targets import TeacherNormalisation, TeacherTargets


class IBOTPatchLoss(nn.Module):
    """Cross-entropy between teacher and student patch prototypes at masked positions.

    Args:
        n_prototypes: K, the iBOT head output width.
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
        self, teacher_logits_masked: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """(M, K) teacher logits of the masked patches -> (M, K) targets.

        The centre is the mean over masked patches only (DINOv2 also averaged in the
        padding rows of its fixed-size buffer).
        """
        return self.teacher_targets(teacher_logits_masked, teacher_temp)

    def update_centre(self) -> None:
        """Once per optimiser step, on every rank: see :class:`TeacherTargets`."""
        self.teacher_targets.update_centre()

    def forward(
        self,
        student_logits_masked: torch.Tensor,
        teacher_probs_masked: torch.Tensor,
        masks: torch.Tensor,
    ) -> torch.Tensor:
        """Per-image mean cross-entropy over masked patches, averaged over images.

        Args:
            student_logits_masked: (M, K) student logits of the masked patches, in the
                row-major order of ``masks.flatten().nonzero()`` (image by image).
            teacher_probs_masked: (M, K) teacher targets of the same patches.
            masks: (B, N) or (B, gx, gy, gz) bool, True where the student saw the mask
                token; B counts every global crop in the batch.

        Returns:
            Scalar loss.
        """
        masked_per_image = masks.flatten(1).sum(dim=1)  # (B,)
        n_masked = student_logits_masked.shape[0]
        if teacher_probs_masked.shape != student_logits_masked.shape:
            raise ValueError(
                f"student {tuple(student_logits_masked.shape)} and teacher "
                f"{tuple(teacher_probs_masked.shape)} masked tokens must both be (M, K)"
            )
        if n_masked != int(masked_per_image.sum()):
            raise ValueError(
                f"{n_masked} masked tokens but the masks hold {int(masked_per_image.sum())}"
            )

        log_p = F.log_softmax(student_logits_masked.float() / self.student_temp, dim=-1)
        cross_entropy = -(teacher_probs_masked.float() * log_p).sum(dim=-1)  # (M,)
        patch_weight = (1.0 / masked_per_image.clamp_min(1)).repeat_interleave(masked_per_image)
        return (cross_entropy * patch_weight).sum() / masks.shape[0]
