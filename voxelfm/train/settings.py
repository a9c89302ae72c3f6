"""The SSL recipe as validated, frozen settings: one dataclass per section of the YAML.

``voxelfm/configs/ssl_default.yaml`` is the one source of the recipe's defaults:
``resolve_ssl_config`` merges a run's overrides into it, and :meth:`SSLSettings.from_config`
checks that resolved mapping (every key present, known, of the right type and range) and
makes it typed. The dataclasses here carry no defaults of their own, so a key missing from
the mapping is an error rather than a second, possibly different default. (The ``crops``
section is parsed by ``voxelfm.ssl.multicrop.MultiCropSettings``, which keeps the YAML's
values as defaults for code that builds views without a config; a test checks they agree.)

The resolved mapping, not the settings, is what is saved beside every checkpoint and hashed
into the run key: values are kept exactly as the mapping gives them (an integer stays an
integer), so training computes with the same numbers as from the mapping itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from voxelfm.errors import VoxelFMError
from voxelfm.ssl.data import IBOTMaskingSettings
from voxelfm.ssl.multicrop import MultiCropSettings

# A field's check: (value, its dotted key) -> the value to store, or a VoxelFMError.
Check = Callable[[Any, str], Any]


def _fail(key: str, expected: str, value: Any) -> VoxelFMError:
    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            hint = " (YAML reads a number like 1e-3 as text: write 1.0e-3)"
        except ValueError:
            pass
    return VoxelFMError(f"SSL config key {key!r} must be {expected}, got {value!r}{hint}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(
    low: float | None = None, high: float | None = None, *, positive: bool = False
) -> dict[str, Check]:
    """A finite int or float (kept as given) in [low, high]; ``positive``: above 0."""
    parts = ["> 0"] if positive else []
    parts += [f">= {low}"] if low is not None else []
    parts += [f"<= {high}"] if high is not None else []
    expected = "a number" + (f" {' and '.join(parts)}" if parts else "")

    def check(value: Any, key: str) -> Any:
        if (
            not _is_number(value)
            or (positive and value <= 0)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            raise _fail(key, expected, value)
        return value

    return {"check": check}


def _integer(low: int) -> dict[str, Check]:
    def check(value: Any, key: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise _fail(key, f"an integer >= {low}", value)
        return value

    return {"check": check}


def _flag() -> dict[str, Check]:
    def check(value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise _fail(key, "true or false", value)
        return value

    return {"check": check}


def _choice(*options: str) -> dict[str, Check]:
    def check(value: Any, key: str) -> str:
        if value not in options:
            raise _fail(key, f"one of {', '.join(options)}", value)
        return value

    return {"check": check}


def _range(low: float, high: float) -> dict[str, Check]:
    """A [min, max] pair of numbers with low <= min <= max <= high, as a tuple."""

    def check(value: Any, key: str) -> tuple[Any, Any]:
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(_is_number(v) for v in value)
            or not low <= value[0] <= value[1] <= high
        ):
            raise _fail(key, f"[min, max] with {low} <= min <= max <= {high}", value)
        return tuple(value)

    return {"check": check}


def _free_mapping() -> dict[str, Check]:
    """Free-form keys, checked by whatever receives them (``model.overrides``)."""

    def check(value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise _fail(key, "a mapping", value)
        return dict(value)

    return {"check": check}


def _section(settings_class: type) -> dict[str, Check]:
    """A nested mapping, read into ``settings_class``."""

    def check(value: Any, key: str) -> Any:
        return _read_section(settings_class, value, key)

    return {"check": check}


def _read_section(settings_class: type, config: Any, path: str = "") -> Any:
    """``settings_class`` from the mapping at ``path`` ("" for the whole recipe): each field
    is the key of its name, checked by the field's own check; any other key is an error."""

    def key(name: str) -> str:
        return f"{path}.{name}" if path else name

    if not isinstance(config, Mapping):
        if not path:
            raise VoxelFMError(f"an SSL config must be a mapping, got {config!r}")
        raise _fail(path, "a mapping", config)
    known = [f.name for f in fields(settings_class)]
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise VoxelFMError(
            f"unknown SSL config key {key(unknown[0])!r}; known keys here: {', '.join(sorted(known))}"
        )
    missing = [name for name in known if name not in config]
    if missing:
        raise VoxelFMError(f"SSL config key {key(missing[0])!r} is missing")
    return settings_class(
        **{f.name: f.metadata["check"](config[f.name], key(f.name)) for f in fields(settings_class)}
    )


@dataclass(frozen=True)
class ModelSettings:
    preset: str = field(metadata=_choice("tiny", "small", "base"))
    overrides: dict[str, Any] = field(metadata=_free_mapping())
    drop_path_rate: float = field(metadata=_number(0, 1))

    @property
    def patch_size(self) -> int:
        # Deferred: the presets live beside the network, and importing it imports torch.
        from voxelfm.models.vision_transformer import VIT_PRESETS

        return self.overrides.get("patch_size", VIT_PRESETS[self.preset]["patch_size"])


@dataclass(frozen=True)
class HeadSettings:
    """The projection head keys shared by the ``dino`` and ``ibot`` sections."""

    head_n_prototypes: int = field(metadata=_integer(1))
    head_bottleneck_dim: int = field(metadata=_integer(1))
    head_nlayers: int = field(metadata=_integer(1))
    head_hidden_dim: int = field(metadata=_integer(1))
    head_weight_norm_gain_trainable: bool = field(metadata=_flag())


@dataclass(frozen=True)
class DINOSettings(HeadSettings):
    loss_weight: float = field(metadata=_number(0))
    koleo_loss_weight: float = field(metadata=_number(0))
    student_temp: float = field(metadata=_number(positive=True))
    teacher_normalisation: str = field(metadata=_choice("centring", "sinkhorn"))
    center_momentum: float = field(metadata=_number(0, 1))


@dataclass(frozen=True)
class IBOTSettings(HeadSettings):
    loss_weight: float = field(metadata=_number(0))
    mask_sample_probability: float = field(metadata=_number(0, 1))
    mask_ratio_min_max: tuple[float, float] = field(metadata=_range(0, 1))
    separate_head: bool = field(metadata=_flag())

    @property
    def masking(self) -> IBOTMaskingSettings:
        return IBOTMaskingSettings(
            mask_probability=float(self.mask_sample_probability),
            mask_ratio_range=tuple(float(r) for r in self.mask_ratio_min_max),
        )


@dataclass(frozen=True)
class TrainSettings:
    batch_size_per_gpu: int = field(metadata=_integer(1))
    total_batch_size: int = field(metadata=_integer(1))
    epochs: int = field(metadata=_integer(1))
    official_epoch_length: int = field(metadata=_integer(1))
    seed: int = field(metadata=_integer(0))
    num_workers: int = field(metadata=_integer(0))
    compute_precision: str = field(metadata=_choice("bf16", "fp32"))
    compile: bool = field(metadata=_flag())

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.official_epoch_length


@dataclass(frozen=True)
class OptimSettings:
    clip_grad: float = field(metadata=_number(0))  # 0: no clipping
    patch_embed_lr_mult: float = field(metadata=_number(0))
    layerwise_decay: float = field(metadata=_number(0, 1, positive=True))
    adamw_beta1: float = field(metadata=_number(0, 1))
    adamw_beta2: float = field(metadata=_number(0, 1))
    scaling_rule: str = field(metadata=_choice("none", "sqrt_wrt_1024"))


@dataclass(frozen=True)
class LRScheduleSettings:
    start: float = field(metadata=_number(0))
    peak: float = field(metadata=_number(0))
    end: float = field(metadata=_number(0))
    warmup_epochs: float = field(metadata=_number(0))
    freeze_last_layer_epochs: float = field(metadata=_number(0))


@dataclass(frozen=True)
class WeightDecayScheduleSettings:
    start: float = field(metadata=_number(0))
    end: float = field(metadata=_number(0))


@dataclass(frozen=True)
class MomentumScheduleSettings:
    start: float = field(metadata=_number(0, 1))
    end: float = field(metadata=_number(0, 1))


@dataclass(frozen=True)
class TeacherTempScheduleSettings:
    start: float = field(metadata=_number(positive=True))
    peak: float = field(metadata=_number(positive=True))
    warmup_epochs: float = field(metadata=_number(0))


@dataclass(frozen=True)
class ScheduleSettings:
    lr: LRScheduleSettings = field(metadata=_section(LRScheduleSettings))
    weight_decay: WeightDecayScheduleSettings = field(
        metadata=_section(WeightDecayScheduleSettings)
    )
    momentum: MomentumScheduleSettings = field(metadata=_section(MomentumScheduleSettings))
    teacher_temp: TeacherTempScheduleSettings = field(
        metadata=_section(TeacherTempScheduleSettings)
    )


@dataclass(frozen=True)
class CheckpointingSettings:
    period_iterations: int = field(metadata=_integer(1))
    max_to_keep: int = field(metadata=_integer(1))


@dataclass(frozen=True)
class MonitoringSettings:
    log_period_iterations: int = field(metadata=_integer(1))


def _crops(value: Any, key: str) -> MultiCropSettings:
    # MultiCropSettings is the one parser of this section; extraction reads it too, from
    # backbones' saved configs, and so it keeps its own defaults (the YAML's values).
    if not isinstance(value, Mapping):
        raise _fail(key, "a mapping", value)
    return MultiCropSettings.from_config(value)


@dataclass(frozen=True)
class SSLSettings:
    """The whole self-distillation recipe, one attribute per section of the YAML."""

    model: ModelSettings = field(metadata=_section(ModelSettings))
    dino: DINOSettings = field(metadata=_section(DINOSettings))
    ibot: IBOTSettings = field(metadata=_section(IBOTSettings))
    crops: MultiCropSettings = field(metadata={"check": _crops})
    train: TrainSettings = field(metadata=_section(TrainSettings))
    optim: OptimSettings = field(metadata=_section(OptimSettings))
    schedules: ScheduleSettings = field(metadata=_section(ScheduleSettings))
    checkpointing: CheckpointingSettings = field(metadata=_section(CheckpointingSettings))
    monitoring: MonitoringSettings = field(metadata=_section(MonitoringSettings))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SSLSettings:
        """From a resolved SSL config (``resolve_ssl_config``, or a run's saved
        ``config.yaml``); a missing, unknown or invalid key is a one-line VoxelFMError."""
        return _read_section(cls, config)
