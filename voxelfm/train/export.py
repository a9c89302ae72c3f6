"""Export the teacher backbone of a finished run for feature extraction.

The teacher (the EMA of the student) is the model DINO-style methods evaluate. Its backbone
is written as safetensors plus a JSON sidecar with the architecture and the resolved config
(``voxelfm.models.weights.save_backbone``), loadable without the heads or the optimiser.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from voxelfm.errors import InputError
from voxelfm.train.checkpoint import load_checkpoint
from voxelfm.train.launch import FINAL_CHECKPOINT, RESOLVED_CONFIG
from voxelfm.utils.atomic import atomic_directory

_TEACHER_BACKBONE = "teacher.backbone."


def export_teacher_backbone(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the teacher backbone of ``run_dir`` into the folder ``out_dir``; returns it."""
    from voxelfm.models.weights import save_backbone
    from voxelfm.train.settings import SSLSettings
    from voxelfm.train.ssl_model import build_backbone

    run_dir = Path(run_dir)
    config_path = run_dir / RESOLVED_CONFIG
    if not config_path.is_file():
        raise InputError(run_dir, f"not a pretraining run folder (no {RESOLVED_CONFIG})")
    config = yaml.safe_load(config_path.read_text())
    state = load_checkpoint(run_dir / FINAL_CHECKPOINT)["model"]
    backbone_state = {
        key[len(_TEACHER_BACKBONE) :]: value
        for key, value in state.items()
        if key.startswith(_TEACHER_BACKBONE)
    }
    backbone = build_backbone(SSLSettings.from_config(config).model, drop_path=False)
    backbone.load_state_dict(backbone_state, strict=True)
    with atomic_directory(out_dir) as tmp:
        save_backbone(backbone, tmp, config=config)
    return Path(out_dir)
