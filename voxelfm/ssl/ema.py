"""Exponential moving average of the student into the teacher (mean teacher, as in DINO)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_teacher_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place, ``teacher = momentum * teacher + (1 - momentum) * student`` per parameter.

    Parameters are paired by name, so a teacher built with different module order or a
    missing submodule fails loudly instead of averaging the wrong tensors. Pass the
    student unwrapped (``ddp_model.module``), as its parameter names must match. Buffers are
    not averaged (DINOv2 does the same); the teacher keeps its own.

    Args:
        teacher: module updated in place; its parameters need not require grad.
        student: module whose parameters are read.
        momentum: weight of the current teacher, in [0, 1] (0.994 in VoxelFM; DINOv2 anneals it to 1).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        mismatch = sorted(teacher_params.keys() ^ student_params.keys())
        raise ValueError(f"teacher and student parameters differ: {mismatch[:5]}")
    names = list(teacher_params)
    teacher_list = [teacher_params[n] for n in names]
    student_list = [student_params[n].detach() for n in names]
    # One fused kernel per dtype/device group instead of one per tensor: the ViT has
    # hundreds of parameter tensors and this runs every step.
    torch._foreach_mul_(teacher_list, momentum)
    torch._foreach_add_(teacher_list, student_list, alpha=1.0 - momentum)
