"""Optimiser parameter groups: layer-wise lr decay, no-decay parameters, last-layer flag."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from voxelfm.ssl.dino_head import DINOHead
from voxelfm.ssl.param_groups import apply_schedule, build_param_groups
from voxelfm.ssl.schedules import ScheduleValues


class TinyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ls1_gamma = nn.Parameter(torch.ones(dim))


class TinyViT(nn.Module):
    """Parameter names of the VoxelFM backbone, with two blocks."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv3d(1, dim, kernel_size=2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, 2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList([TinyBlock(dim), TinyBlock(dim)])
        self.norm = nn.LayerNorm(dim)


def settings_by_name(groups):
    return {
        name: (group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"])
        for group in groups
        for name in group["param_names"]
    }


@pytest.fixture
def student():
    return nn.ModuleDict(
        {"backbone": TinyViT(), "dino_head": DINOHead(4, 8, hidden_dim=6, bottleneck_dim=3)}
    )


def test_layerwise_decay_and_no_decay_parameters(student):
    settings = settings_by_name(
        build_param_groups(student, num_layers=2, layer_decay=0.5, patch_embed_lr_mult=0.2)
    )
    # 2 blocks: embeddings are depth 0 -> 0.5 ** 3, block i is depth i + 1, the final norm
    # and the heads are depth 3 -> 1.
    assert settings["backbone.patch_embed.weight"] == pytest.approx((0.125 * 0.2, 1.0, False))
    assert settings["backbone.patch_embed.bias"] == pytest.approx((0.125 * 0.2, 0.0, False))
    for token in ("cls_token", "register_tokens", "mask_token"):
        assert settings[f"backbone.{token}"] == pytest.approx((0.125, 0.0, False))
    assert settings["backbone.blocks.0.qkv.weight"] == pytest.approx((0.25, 1.0, False))
    assert settings["backbone.blocks.0.qkv.bias"] == pytest.approx((0.25, 0.0, False))
    assert settings["backbone.blocks.0.norm1.weight"] == pytest.approx((0.25, 0.0, False))
    assert settings["backbone.blocks.1.ls1_gamma"] == pytest.approx((0.5, 0.0, False))
    assert settings["backbone.blocks.1.qkv.weight"] == pytest.approx((0.5, 1.0, False))
    assert settings["backbone.norm.weight"] == pytest.approx((1.0, 0.0, False))
    assert settings["dino_head.mlp.0.weight"] == pytest.approx((1.0, 1.0, False))
    assert settings["dino_head.last_layer.parametrizations.weight.original1"] == (1.0, 1.0, True)
    # The trainable weight-norm gain is (K, 1): decayed and frozen with the last layer, as in
    # the reference.
    assert settings["dino_head.last_layer.parametrizations.weight.original0"] == (1.0, 1.0, True)


def test_every_trainable_parameter_in_exactly_one_group(student):
    groups = build_param_groups(student, num_layers=2)
    grouped = [id(p) for group in groups for p in group["params"]]
    trainable = [id(p) for p in student.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    assert len(trainable) == len(list(student.parameters()))


def test_frozen_gain_option_leaves_the_gain_out():
    student = nn.ModuleDict(
        {
            "backbone": TinyViT(),
            "dino_head": DINOHead(4, 8, hidden_dim=6, bottleneck_dim=3, trainable_gain=False),
        }
    )
    names = settings_by_name(build_param_groups(student, num_layers=2))
    assert "dino_head.last_layer.parametrizations.weight.original0" not in names
    assert "dino_head.last_layer.parametrizations.weight.original1" in names


def test_schedule_values_reach_the_optimiser(student):
    groups = build_param_groups(student, num_layers=2, layer_decay=0.5, patch_embed_lr_mult=0.2)
    optimizer = torch.optim.AdamW(groups)
    apply_schedule(optimizer, ScheduleValues(1e-3, 0.0, 0.04, 0.994, 0.04))
    by_first_name = {g["param_names"][0]: g for g in optimizer.param_groups}
    patch_embed = by_first_name["backbone.patch_embed.weight"]
    assert patch_embed["lr"] == pytest.approx(1e-3 * 0.125 * 0.2)
    assert patch_embed["weight_decay"] == pytest.approx(0.04)
    assert by_first_name["backbone.patch_embed.bias"]["weight_decay"] == 0.0
    last_layer = next(g for g in optimizer.param_groups if g["is_last_layer"])
    assert last_layer["lr"] == 0.0  # frozen during the first epoch
