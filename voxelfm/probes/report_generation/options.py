"""The ``options`` of a report_generation task, checked with one-line errors.

Every key is optional. Shared by the generating probes::

    n_visual_tokens 8      visual tokens the projector hands to the language model
    visual_inputs   auto   auto (patch tokens pooled to token_grid when the store has them,
                           else the global vector as one token) | patch | global
    beam_size       1      1 = greedy decoding
    length_penalty  1.0    beam ranking: summed log-probability / length ** length_penalty
    max_new_tokens  null   generated tokens at most (null: longest training report + 16)
    max_length      256    training reports are cut to this many tokens
    device          auto   auto (cuda when available) | cpu | cuda | cuda:N

The decoder probe: ``width`` 128, ``n_layers`` 2, ``n_heads`` 4, ``dropout`` 0.1, ``lr`` 1e-3,
``weight_decay`` 0.01, ``max_epochs`` 60, ``patience`` 10, ``batch_size`` 16.

The llm probe: ``llm_path`` (required: a local ``save_pretrained`` folder), ``lora_rank`` 8,
``lora_alpha`` 16, ``lora_dropout`` 0.05, ``lora_target_modules`` (null: peft's default for
the architecture), ``llm_lr`` 1e-3, ``llm_max_epochs`` 10, ``llm_patience`` 3,
``llm_batch_size`` 4.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from voxelfm.errors import VoxelFMError
from voxelfm.probes.report_generation.decoder import DecoderSettings
from voxelfm.probes.report_generation.llm import LLMSettings

VISUAL_INPUTS = ("auto", "patch", "global")
_POSITIVE_INTS = (
    "n_visual_tokens",
    "beam_size",
    "width",
    "n_layers",
    "n_heads",
    "max_epochs",
    "patience",
    "batch_size",
    "lora_rank",
    "llm_max_epochs",
    "llm_patience",
    "llm_batch_size",
)
_POSITIVE_FLOATS = ("lr", "llm_lr", "lora_alpha")
_NON_NEGATIVE_FLOATS = ("weight_decay", "length_penalty")
_FRACTIONS = ("dropout", "lora_dropout")


@dataclass(frozen=True)
class ReportSettings:
    """The settings of one report_generation task, checked from its ``options`` (defaults in
    the module docstring)."""

    n_visual_tokens: int = 8
    visual_inputs: str = "auto"
    beam_size: int = 1
    length_penalty: float = 1.0
    max_new_tokens: int | None = None
    max_length: int = 256
    device: str = "auto"
    width: int = 128
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_epochs: int = 60
    patience: int = 10
    batch_size: int = 16
    llm_path: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] | None = None
    llm_lr: float = 1e-3
    llm_max_epochs: int = 10
    llm_patience: int = 3
    llm_batch_size: int = 4

    @classmethod
    def from_mapping(
        cls, options: Mapping[str, Any], *, task: str = "report_generation", probes=()
    ) -> ReportSettings:
        """Check ``options``; ``probes`` are the task's probes (llm needs ``llm_path``)."""
        where = f"task {task!r}: options"
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise VoxelFMError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        values = dict(options)
        for key in _POSITIVE_INTS:
            if key in values:
                values[key] = _integer(values[key], f"{where}.{key}", minimum=1)
        if values.get("max_new_tokens") is not None:
            values["max_new_tokens"] = _integer(
                values["max_new_tokens"], f"{where}.max_new_tokens", minimum=1
            )
        if "max_length" in values:
            values["max_length"] = _integer(values["max_length"], f"{where}.max_length", minimum=4)
        for key in (*_POSITIVE_FLOATS, *_NON_NEGATIVE_FLOATS, *_FRACTIONS):
            if key in values:
                values[key] = _number(values[key], f"{where}.{key}")
        for key in _POSITIVE_FLOATS:
            if key in values and values[key] <= 0:
                raise VoxelFMError(f"{where}.{key} must be positive, got {values[key]}")
        for key in _NON_NEGATIVE_FLOATS:
            if key in values and values[key] < 0:
                raise VoxelFMError(f"{where}.{key} must be >= 0, got {values[key]}")
        for key in _FRACTIONS:
            if key in values and not 0 <= values[key] < 1:
                raise VoxelFMError(f"{where}.{key} must be in [0, 1), got {values[key]}")
        if values.get("visual_inputs", "auto") not in VISUAL_INPUTS:
            raise VoxelFMError(
                f"{where}.visual_inputs must be one of {list(VISUAL_INPUTS)}, "
                f"got {values['visual_inputs']!r}"
            )
        device = values.get("device", "auto")
        if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise VoxelFMError(f"{where}.device must be auto, cpu, cuda or cuda:N, got {device!r}")
        targets = values.get("lora_target_modules")
        if targets is not None:
            if isinstance(targets, str):
                targets = [targets]
            if not all(isinstance(t, str) and t for t in targets):
                raise VoxelFMError(f"{where}.lora_target_modules must be module names")
            values["lora_target_modules"] = tuple(targets)
        llm_path = values.get("llm_path")
        if llm_path is not None and not isinstance(llm_path, str):
            raise VoxelFMError(f"{where}.llm_path must be a folder path, got {llm_path!r}")
        if "llm" in probes and not llm_path:
            raise VoxelFMError(
                f"{where}.llm_path is required by the llm probe (a local causal language model "
                "folder written by save_pretrained)"
            )
        parsed = cls(**values)
        if parsed.width % parsed.n_heads:
            raise VoxelFMError(
                f"{where}: width {parsed.width} is not divisible by n_heads {parsed.n_heads}"
            )
        return parsed

    @property
    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def decoder_settings(self) -> DecoderSettings:
        return DecoderSettings(
            width=self.width,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_visual_tokens=self.n_visual_tokens,
            dropout=self.dropout,
            lr=self.lr,
            weight_decay=self.weight_decay,
            max_epochs=self.max_epochs,
            patience=self.patience,
            batch_size=self.batch_size,
            max_length=self.max_length,
            beam_size=self.beam_size,
            length_penalty=self.length_penalty,
            max_new_tokens=self.max_new_tokens,
            device=self.torch_device,
        )

    def llm_settings(self) -> LLMSettings:
        if not self.llm_path:
            raise VoxelFMError("options.llm_path is required by the llm probe")
        return LLMSettings(
            llm_path=self.llm_path,
            n_visual_tokens=self.n_visual_tokens,
            n_heads=self.n_heads,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            lora_target_modules=self.lora_target_modules,
            lr=self.llm_lr,
            weight_decay=self.weight_decay,
            max_epochs=self.llm_max_epochs,
            patience=self.llm_patience,
            batch_size=self.llm_batch_size,
            max_length=self.max_length,
            beam_size=self.beam_size,
            length_penalty=self.length_penalty,
            max_new_tokens=self.max_new_tokens,
            device=self.torch_device,
        )


def _integer(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise VoxelFMError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VoxelFMError(f"{name} must be a number, got {value!r}")
    return float(value)
