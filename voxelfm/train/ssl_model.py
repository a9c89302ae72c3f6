"""Student and teacher networks and the combined DINO + iBOT + KoLeo objective.

The student sees every crop (global crops with iBOT masks, local crops plain) and learns by
gradient; the teacher sees only the unmasked global crops and follows the student by EMA.
One ``SelfDistillationModel.forward`` computes the weighted total loss for a batch; the
training loop owns optimisation, schedules and the EMA update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from voxelfm.models.vision_transformer import VisionTransformer3D, build_vit
from voxelfm.ssl.dino_head import DINOHead
from voxelfm.ssl.losses.dino_clstoken_loss import DINOLoss
from voxelfm.ssl.losses.ibot_patch_loss import IBOTPatchLoss
from voxelfm.ssl.losses.koleo_loss import KoLeoLoss
from voxelfm.train.settings import HeadSettings, ModelSettings, SSLSettings

N_GLOBAL_CROPS = 2


@dataclass
class StepOutputs:
    """Losses of one micro-batch (scalars) and the teacher statistics used for monitoring."""

    total: Tensor
    dino: Tensor
    ibot: Tensor
    koleo: Tensor
    teacher_cls: Tensor  # (2B, D) teacher CLS embeddings of the global crops, detached
    teacher_probs: Tensor  # (2, B, K) teacher DINO targets, detached


def build_backbone(model: ModelSettings, *, drop_path: bool) -> VisionTransformer3D:
    """The backbone of an SSL recipe; the teacher gets no stochastic depth."""
    rate = model.drop_path_rate if drop_path else 0.0
    return build_vit(model.preset, **{**model.overrides, "drop_path_rate": rate})


def _build_head(embed_dim: int, head: HeadSettings) -> DINOHead:
    return DINOHead(
        embed_dim,
        n_prototypes=head.head_n_prototypes,
        n_layers=head.head_nlayers,
        hidden_dim=head.head_hidden_dim,
        bottleneck_dim=head.head_bottleneck_dim,
        trainable_gain=head.head_weight_norm_gain_trainable,
    )


def _build_branch(settings: SSLSettings, *, drop_path: bool) -> nn.ModuleDict:
    backbone = build_backbone(settings.model, drop_path=drop_path)
    modules = {"backbone": backbone, "dino_head": _build_head(backbone.embed_dim, settings.dino)}
    if settings.ibot.separate_head:
        modules["ibot_head"] = _build_head(backbone.embed_dim, settings.ibot)
    return nn.ModuleDict(modules)


def _gather_with_grad(features: Tensor) -> Tensor:
    """All ranks' rows, differentiable; identity outside torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return features
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(features), dim=0)


class SelfDistillationModel(nn.Module):
    """Student, EMA teacher and the three losses of the VoxelFM recipe.

    The teacher starts as an exact copy of the student (DINO) and never receives gradients.
    KoLeo is computed on the CLS features of the whole global batch gathered across ranks,
    so the loss, and hence training, does not depend on how the batch is split over GPUs
    (DINOv2 computes it per GPU).
    """

    def __init__(self, settings: SSLSettings):
        super().__init__()
        self.student = _build_branch(settings, drop_path=True)
        self.teacher = _build_branch(settings, drop_path=False)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

        dino, ibot = settings.dino, settings.ibot
        self.dino_loss = DINOLoss(
            dino.head_n_prototypes,
            student_temp=dino.student_temp,
            teacher_normalisation=dino.teacher_normalisation,
            centre_momentum=dino.center_momentum,
        )
        self.ibot_loss = IBOTPatchLoss(
            ibot.head_n_prototypes,
            student_temp=dino.student_temp,
            teacher_normalisation=dino.teacher_normalisation,
            centre_momentum=dino.center_momentum,
        )
        self.koleo_loss = KoLeoLoss()
        self.weights = {
            "dino": dino.loss_weight,
            "ibot": ibot.loss_weight,
            "koleo": dino.koleo_loss_weight,
        }

    @property
    def ibot_head_key(self) -> str:
        return "ibot_head" if "ibot_head" in self.student else "dino_head"

    def train(self, mode: bool = True) -> SelfDistillationModel:
        super().train(mode)
        self.teacher.eval()  # the teacher is a fixed target within each step
        return self

    @torch.no_grad()
    def _teacher_targets(
        self, global_crops: Tensor, masks: Tensor, teacher_temp: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch = global_crops.shape[0] // N_GLOBAL_CROPS
        out = self.teacher["backbone"](global_crops)
        cls_logits = self.teacher["dino_head"](out.x_norm_clstoken)  # (2B, K)
        dino_probs = self.dino_loss.teacher_probabilities(
            cls_logits.reshape(N_GLOBAL_CROPS, batch, -1), teacher_temp
        )  # (2, B, K)
        masked_tokens = out.x_norm_patchtokens[masks]  # (M, D)
        ibot_probs = self.ibot_loss.teacher_probabilities(
            self.teacher[self.ibot_head_key](masked_tokens), teacher_temp
        )  # (M, K)
        return dino_probs, ibot_probs, out.x_norm_clstoken

    def forward(
        self, global_crops: Tensor, local_crops: Tensor | None, masks: Tensor, teacher_temp: float
    ) -> StepOutputs:
        """Loss of one micro-batch.

        Args:
            global_crops: (2B, 1, G, G, G), view 0 of every sample, then view 1.
            local_crops: (LB, 1, L, L, L) in the same view-major order, or None.
            masks: (2B, N) bool iBOT masks of the global crops (True = hidden).
            teacher_temp: teacher softmax temperature of this iteration.
        """
        batch = global_crops.shape[0] // N_GLOBAL_CROPS
        dino_probs, ibot_probs, teacher_cls = self._teacher_targets(
            global_crops, masks, teacher_temp
        )

        student_global = self.student["backbone"](global_crops, masks=masks)
        global_logits = self.student["dino_head"](student_global.x_norm_clstoken)  # (2B, K)
        local_logits = None
        if local_crops is not None and local_crops.shape[0]:
            student_local = self.student["backbone"](local_crops)
            local_logits = self.student["dino_head"](student_local.x_norm_clstoken)
            local_logits = local_logits.reshape(-1, batch, local_logits.shape[-1])  # (L, B, K)
        dino = self.dino_loss(
            global_logits.reshape(N_GLOBAL_CROPS, batch, -1), local_logits, dino_probs
        )

        masked_student = student_global.x_norm_patchtokens[masks]  # (M, D)
        ibot = self.ibot_loss(self.student[self.ibot_head_key](masked_student), ibot_probs, masks)

        # One KoLeo term per global view, so two crops of a scan are never neighbours.
        student_cls = student_global.x_norm_clstoken.reshape(N_GLOBAL_CROPS, batch, -1)
        koleo = sum(self.koleo_loss(_gather_with_grad(view)) for view in student_cls)

        total = (
            self.weights["dino"] * dino
            + self.weights["ibot"] * ibot
            + self.weights["koleo"] * koleo
        )
        return StepOutputs(
            total=total,
            dino=dino.detach(),
            ibot=ibot.detach(),
            koleo=koleo.detach(),
            teacher_cls=teacher_cls.detach(),
            teacher_probs=dino_probs.detach(),
        )

    @torch.no_grad()
    def update_centres(self) -> None:
        """After each optimiser step, on every rank (a collective when distributed)."""
        self.dino_loss.update_centre()
        self.ibot_loss.update_centre()
