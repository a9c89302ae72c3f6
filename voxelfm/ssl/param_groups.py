"""AdamW parameter groups for the student: layer-wise lr decay, no decay on gains and
tokens, and a flag on the prototype layer so it can be frozen at the start.

Each group carries ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer``; every
iteration :func:`apply_schedule` sets ``lr = scheduled lr x lr_multiplier`` (the last-layer
lr for flagged groups) and ``weight_decay = scheduled wd x wd_multiplier``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from voxelfm.models.vision_transformer import layer_id_for_param
from voxelfm.ssl.schedules import ScheduleValues

LayerIdFn = Callable[[str, int], int]

# Learned tokens and position embeddings are not weights that map features; shrinking them
# towards zero only erases what they encode.
_TOKEN_NAMES = ("pos_embed", "cls_token", "register_tokens", "mask_token")


def build_param_groups(
    student: Mapping[str, nn.Module],
    *,
    num_layers: int,
    layer_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    layer_id_fn: LayerIdFn = layer_id_for_param,
    backbone_key: str = "backbone",
) -> list[dict]:
    """Optimiser parameter groups for the student's backbone and heads.

    Backbone parameters at depth ``layer_id`` get ``lr_multiplier = layer_decay **
    (num_layers + 1 - layer_id)``, times ``patch_embed_lr_mult`` for the patch embedding;
    head parameters get 1. Biases, norm weights, LayerScale gammas (every parameter of at
    most one dimension) and learned tokens get ``wd_multiplier = 0``. Parameters of a module
    named ``last_layer`` (the heads' prototypes and their weight-norm gain, which is
    weight-decayed like them) are flagged ``is_last_layer``. Frozen parameters (e.g. a gain
    frozen with ``head_weight_norm_gain_trainable: false``) are left out.

    Parameters with equal settings share a group, in order of first appearance, so the
    optimiser state of a checkpoint lines up on resume.

    Args:
        student: the student's submodules by name (``backbone``, ``dino_head``, ...),
            unwrapped from DDP.
        num_layers: number of transformer blocks in the backbone.
        layer_decay: lr decay per block going down from the top (0.9 in VoxelFM).
        patch_embed_lr_mult: extra lr factor of the patch embedding (0.2 in VoxelFM).
        layer_id_fn: ``(name relative to the backbone, num_layers) -> depth``.
        backbone_key: which submodule gets the layer-wise decay.

    Returns:
        Dicts with ``params``, ``param_names``, ``lr_multiplier``, ``wd_multiplier`` and
        ``is_last_layer``, ready for ``torch.optim.AdamW``.
    """
    if backbone_key not in student:
        raise KeyError(f"student has no {backbone_key!r} submodule: {sorted(student)}")
    groups: dict[tuple[float, float, bool], dict] = {}
    for module_key, module in student.items():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            lr_multiplier = 1.0
            if module_key == backbone_key:
                depth = layer_id_fn(name, num_layers)
                lr_multiplier = layer_decay ** (num_layers + 1 - depth)
                if name.startswith("patch_embed."):
                    lr_multiplier *= patch_embed_lr_mult
            no_decay = param.ndim <= 1 or name.split(".")[-1] in _TOKEN_NAMES
            is_last_layer = "last_layer" in name.split(".")
            key = (lr_multiplier, 0.0 if no_decay else 1.0, is_last_layer)
            group = groups.setdefault(
                key,
                {
                    "params": [],
                    "param_names": [],
                    "lr_multiplier": key[0],
                    "wd_multiplier": key[1],
                    "is_last_layer": key[2],
                },
            )
            group["params"].append(param)
            group["param_names"].append(f"{module_key}.{name}")
    return list(groups.values())


def apply_schedule(optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
    """Set every group's lr and weight decay for this iteration from the schedules."""
    for group in optimizer.param_groups:
        base_lr = values.last_layer_lr if group["is_last_layer"] else values.lr
        group["lr"] = base_lr * group["lr_multiplier"]
        group["weight_decay"] = values.weight_decay * group["wd_multiplier"]
