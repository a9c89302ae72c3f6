"""Schedules at key iterations, against VoxelFM's array construction redone in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from voxelfm.ssl.schedules import SSLSchedules, WarmupCosineSchedule, sqrt_batch_scaled_lr


def numpy_voxelfm_curve(start, peak, end, warmup, total, cosine=None) -> np.ndarray:
    """VoxelFM's linear_warmup_cosine_decay as a whole array."""
    cosine = total - warmup if cosine is None else cosine
    ramp = np.linspace(start, peak, warmup, endpoint=False)
    half_cosine = (peak - end) * (np.cos(np.linspace(0, np.pi, cosine)) + 1) / 2 + end
    return np.concatenate([ramp, half_cosine, np.full(total - warmup - cosine, end)])


@pytest.mark.parametrize(
    "params",
    [
        {"start": 0.0, "peak": 1e-3, "end": 1e-6, "warmup": 10, "total": 100},  # lr
        {"start": 0.04, "peak": 0.04, "end": 0.2, "warmup": 0, "total": 50},  # weight decay
        {
            "start": 0.04,
            "peak": 0.07,
            "end": 0.07,
            "warmup": 30,
            "total": 100,
        },  # teacher temperature
        {
            "start": 0.0,
            "peak": 1.0,
            "end": 0.5,
            "warmup": 5,
            "total": 40,
            "cosine": 20,
        },  # constant tail
    ],
)
def test_schedule_equals_voxelfm_array(params):
    expected = numpy_voxelfm_curve(**params)
    schedule = WarmupCosineSchedule(
        start=params["start"],
        peak=params["peak"],
        end=params["end"],
        warmup_iters=params["warmup"],
        total_iters=params["total"],
        cosine_iters=params.get("cosine"),
    )
    np.testing.assert_allclose([schedule(i) for i in range(params["total"])], expected, rtol=1e-12)


def test_lr_at_key_iterations():
    lr = WarmupCosineSchedule(start=0.0, peak=1e-3, end=1e-6, warmup_iters=10, total_iters=111)
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(5e-4)
    assert lr(10) == pytest.approx(1e-3)  # end of warmup: the peak
    assert lr(60) == pytest.approx((1e-3 + 1e-6) / 2)  # half-way through the cosine
    assert lr(110) == pytest.approx(1e-6)  # last iteration
    assert lr(500) == pytest.approx(1e-6)  # past the end stays at the end


def test_voxelfm_schedules_by_epoch_with_last_layer_freeze():
    per_epoch, epochs = 10, 100
    schedules = SSLSchedules(
        lr=WarmupCosineSchedule.from_epochs(0.0, 1e-3, 1e-6, 10, epochs, per_epoch),
        weight_decay=WarmupCosineSchedule.from_epochs(0.04, 0.04, 0.2, 0, epochs, per_epoch),
        teacher_momentum=WarmupCosineSchedule.from_epochs(0.994, 0.994, 1.0, 0, epochs, per_epoch),
        teacher_temp=WarmupCosineSchedule.from_epochs(0.04, 0.07, 0.07, 30, epochs, per_epoch),
        freeze_last_layer_iters=per_epoch,
    )
    first, after_freeze, last = schedules.at(0), schedules.at(per_epoch), schedules.at(999)
    assert first.last_layer_lr == 0.0 and first.lr == 0.0
    assert schedules.at(per_epoch - 1).last_layer_lr == 0.0
    assert after_freeze.last_layer_lr == after_freeze.lr == pytest.approx(1e-4)
    assert first.weight_decay == pytest.approx(0.04)
    assert last.weight_decay == pytest.approx(0.2)
    assert first.teacher_momentum == pytest.approx(0.994)
    assert last.teacher_momentum == pytest.approx(1.0)
    assert first.teacher_temp == pytest.approx(0.04)
    assert schedules.at(150).teacher_temp == pytest.approx(0.055)  # half-way through warmup
    assert schedules.at(300).teacher_temp == pytest.approx(0.07)
    assert last.teacher_temp == pytest.approx(0.07)


def test_dinov2_sqrt_batch_scaling():
    assert sqrt_batch_scaled_lr(1e-3, 1024) == pytest.approx(1e-3)
    assert sqrt_batch_scaled_lr(1e-3, 2048) == pytest.approx(1e-3 * math.sqrt(2))


def test_phases_longer_than_training_are_rejected():
    with pytest.raises(ValueError, match="exceed"):
        WarmupCosineSchedule(0.0, 1.0, 0.0, warmup_iters=10, total_iters=20, cosine_iters=15)
