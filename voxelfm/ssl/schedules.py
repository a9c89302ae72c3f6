"""Per-iteration schedules of the learning rate, weight decay, teacher momentum and teacher
temperature.

Every schedule is a pure function of the iteration: nothing to checkpoint, and a resumed
run sees exactly the values an uninterrupted one would.

The curve is VoxelFM's ``linear_warmup_cosine_decay``: linear from ``start`` towards
``peak`` over the warmup (``peak`` itself is first reached at the end of warmup), a
half-cosine from ``peak`` down (or up) to ``end`` whose last iteration is exactly ``end``,
then ``end`` for any remaining iterations. VoxelFM's defaults, for reference:

- lr: 0 -> 1e-3 over 10 epochs, cosine to 1e-6; head last layer frozen for 1 epoch;
- weight decay: 0.04 -> 0.2 by cosine, no warmup;
- teacher momentum: 0.994 constant (DINOv2 anneals 0.994 -> 1);
- teacher temperature: 0.04 -> 0.07 over 30 epochs, then constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """Linear warmup, half-cosine to ``end``, then constant; call with the iteration.

    Args:
        start: value at iteration 0.
        peak: value at the end of warmup, where the cosine begins.
        end: value at the last cosine iteration and after.
        warmup_iters: length of the linear ramp (0 starts directly at ``peak``).
        total_iters: length of training.
        cosine_iters: length of the cosine; by default all iterations after warmup.
    """

    start: float
    peak: float
    end: float
    warmup_iters: int
    total_iters: int
    cosine_iters: int | None = None

    def __post_init__(self) -> None:
        if self.warmup_iters < 0 or self.total_iters < 1:
            raise ValueError("warmup_iters must be >= 0 and total_iters >= 1")
        if self.warmup_iters + self._cosine_iters > self.total_iters:
            raise ValueError(
                f"warmup ({self.warmup_iters}) + cosine ({self._cosine_iters}) iterations "
                f"exceed total_iters ({self.total_iters})"
            )

    @classmethod
    def from_epochs(
        cls,
        start: float,
        peak: float,
        end: float,
        warmup_epochs: float,
        epochs: int,
        iters_per_epoch: int,
        cosine_epochs: float | None = None,
    ) -> WarmupCosineSchedule:
        """The schedule with its phases given in epochs of ``iters_per_epoch`` iterations."""
        return cls(
            start=start,
            peak=peak,
            end=end,
            warmup_iters=int(warmup_epochs * iters_per_epoch),
            total_iters=epochs * iters_per_epoch,
            cosine_iters=None if cosine_epochs is None else int(cosine_epochs * iters_per_epoch),
        )

    @property
    def _cosine_iters(self) -> int:
        if self.cosine_iters is None:
            return self.total_iters - self.warmup_iters
        return self.cosine_iters

    def __call__(self, iteration: int) -> float:
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        if iteration < self.warmup_iters:
            return self.start + (self.peak - self.start) * iteration / self.warmup_iters
        step = iteration - self.warmup_iters
        if step >= self._cosine_iters:
            return self.end
        progress = step / (self._cosine_iters - 1) if self._cosine_iters > 1 else 0.0
        return self.end + (self.peak - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class ScheduleValues:
    """Everything the training loop sets at one iteration."""

    lr: float
    last_layer_lr: float  # lr of the head's last (prototype) layer; 0 while it is frozen
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float


@dataclass(frozen=True)
class SSLSchedules:
    """The four schedules of self-distillation plus the freeze of the prototype layer.

    ``freeze_last_layer_iters``: the head's last layer gets lr 0 for this many iterations
    (one epoch in DINO/VoxelFM); updating the prototypes while the backbone is still
    random lets the student collapse onto a few of them early on.
    """

    lr: WarmupCosineSchedule
    weight_decay: WarmupCosineSchedule
    teacher_momentum: WarmupCosineSchedule
    teacher_temp: WarmupCosineSchedule
    freeze_last_layer_iters: int

    def at(self, iteration: int) -> ScheduleValues:
        lr = self.lr(iteration)
        return ScheduleValues(
            lr=lr,
            last_layer_lr=0.0 if iteration < self.freeze_last_layer_iters else lr,
            weight_decay=self.weight_decay(iteration),
            teacher_momentum=self.teacher_momentum(iteration),
            teacher_temp=self.teacher_temp(iteration),
        )


def sqrt_batch_scaled_lr(
    base_lr: float, total_batch_size: int, reference_batch_size: int = 1024
) -> float:
    """DINOv2's learning-rate scaling rule: ``base_lr * sqrt(total_batch / 1024)``.

    The square root suits Adam-type optimisers, whose update size does not grow linearly
    with the batch. VoxelFM itself does not scale: its peak 1e-3 is used at a total batch
    of 2048 as is; use this only when following DINOv2's recipe.
    """
    return base_lr * math.sqrt(total_batch_size / reference_batch_size)
