"""DINO head (layout of published checkpoints, weight-norm gain) and the teacher EMA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from voxelfm.ssl.dino_head import DINOHead
from voxelfm.ssl.ema import update_teacher_


def small_head(seed: int = 0) -> DINOHead:
    torch.manual_seed(seed)
    return DINOHead(in_dim=8, n_prototypes=16, hidden_dim=12, bottleneck_dim=4)


def test_head_state_dict_keys_match_published_voxelfm_checkpoints():
    assert list(small_head().state_dict()) == [
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp.4.weight",
        "mlp.4.bias",
        "last_layer.parametrizations.weight.original0",
        "last_layer.parametrizations.weight.original1",
    ]


def test_single_layer_head_keeps_the_mlp_prefix():
    head = DINOHead(in_dim=8, n_prototypes=16, n_layers=1, bottleneck_dim=4)
    assert [k for k in head.state_dict() if k.startswith("mlp.")] == ["mlp.0.weight", "mlp.0.bias"]


def test_prototypes_start_as_unit_vectors_with_a_trainable_gain_by_default():
    head = small_head()
    gain = head.last_layer.parametrizations.weight.original0
    assert gain.requires_grad  # as in the reference (head_weight_norm_gain_trainable)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(16))
    head(torch.randn(5, 8)).pow(2).sum().backward()
    assert gain.grad is not None and gain.grad.abs().sum() > 0


def test_frozen_gain_option_keeps_unit_prototypes_so_logits_are_cosines():
    torch.manual_seed(0)
    head = DINOHead(
        in_dim=8, n_prototypes=16, hidden_dim=12, bottleneck_dim=4, trainable_gain=False
    )
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(16))
    logits = head(torch.randn(5, 3, 8))
    assert logits.shape == (5, 3, 16)
    assert logits.abs().max() <= 1.0 + 1e-6


def test_head_loads_both_weight_norm_key_layouts():
    source, target = small_head(seed=0), small_head(seed=1)
    x = torch.randn(4, 8)

    target.load_state_dict(source.state_dict())  # VoxelFM layout (parametrizations)
    torch.testing.assert_close(target(x), source(x))

    # Original DINOv2 checkpoints, written with torch.nn.utils.weight_norm.
    legacy = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in source.state_dict().items()
    }
    assert "last_layer.weight_v" in legacy
    fresh = small_head(seed=2)
    fresh.load_state_dict(legacy)
    torch.testing.assert_close(fresh(x), source(x))


def test_ema_update_by_hand():
    teacher, student = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, 2.0]]))
        teacher.bias.fill_(4.0)
        student.weight.copy_(torch.tensor([[3.0, -2.0]]))
        student.bias.fill_(0.0)
    update_teacher_(teacher, student, momentum=0.75)
    # 0.75 * teacher + 0.25 * student
    np.testing.assert_allclose(teacher.weight.detach().numpy(), [[1.5, 1.0]])
    np.testing.assert_allclose(teacher.bias.detach().numpy(), [3.0])
    np.testing.assert_allclose(student.weight.detach().numpy(), [[3.0, -2.0]])  # untouched


def test_ema_refuses_mismatched_modules():
    with pytest.raises(ValueError, match="differ"):
        update_teacher_(nn.Linear(2, 1), nn.Sequential(nn.Linear(2, 1)), momentum=0.9)
