"""The SSL recipe's settings: built from the resolved config, every key checked, the YAML the
one source of defaults, and the resolved config itself (saved and hashed) left as it was."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from voxelfm.errors import VoxelFMError
from voxelfm.ssl.data import IBOTMaskingSettings
from voxelfm.ssl.multicrop import MultiCropSettings
from voxelfm.train import settings as settings_module
from voxelfm.train.config import config_hash, default_ssl_config, resolve_ssl_config
from voxelfm.train.settings import SSLSettings


def _settings_classes(cls: type) -> list[type]:
    """``cls`` and every settings dataclass nested in it (not the multi-crop settings)."""
    found = [cls]
    for item in dataclasses.fields(cls):
        nested = getattr(settings_module, str(item.type), None)
        if dataclasses.is_dataclass(nested) and nested is not MultiCropSettings:
            found += _settings_classes(nested)
    return found


def test_default_recipe_reads_into_typed_sections():
    settings = SSLSettings.from_config(resolve_ssl_config())
    assert settings.model.preset == "base" and settings.model.patch_size == 14
    assert settings.train.total_iterations == 100 * 1000
    assert settings.schedules.lr.peak == 1.0e-3
    assert settings.crops == MultiCropSettings()
    assert settings.ibot.masking == IBOTMaskingSettings()
    assert settings.dino.teacher_normalisation == "centring"


def test_the_yaml_is_the_one_source_of_defaults():
    classes = _settings_classes(SSLSettings)
    assert len(classes) > 10
    with_defaults = [
        f"{cls.__name__}.{item.name}"
        for cls in classes
        for item in dataclasses.fields(cls)
        if item.default is not dataclasses.MISSING
        or item.default_factory is not dataclasses.MISSING
    ]
    assert not with_defaults


def test_settings_leave_the_resolved_config_as_it_was():
    overrides = {"model": {"preset": "tiny", "overrides": {"depth": 2}}, "train": {"epochs": 3}}
    config = resolve_ssl_config(overrides)
    saved, key = yaml.safe_dump(config, sort_keys=False), config_hash(config)
    SSLSettings.from_config(config)
    assert yaml.safe_dump(config, sort_keys=False) == saved
    assert config_hash(config) == key
    # Integers stay integers: training computes with the mapping's own numbers.
    assert SSLSettings.from_config(config).schedules.lr.warmup_epochs == 10
    assert isinstance(SSLSettings.from_config(config).schedules.lr.warmup_epochs, int)


def _with(path: str, value) -> dict:
    config = copy.deepcopy(resolve_ssl_config())
    *parents, last = path.split(".")
    section = config
    for name in parents:
        section = section[name]
    if value is _DELETE:
        del section[last]
    else:
        section[last] = value
    return config


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("optim.lr", 0.1, "unknown SSL config key 'optim.lr'; known keys here: adamw_beta1"),
        ("crops.local_crop_number", 8, "crops.local_crop_number"),
        ("extra", {}, "unknown SSL config key 'extra'; known keys here: checkpointing"),
        ("train.seed", _DELETE, "SSL config key 'train.seed' is missing"),
        ("schedules.lr.peak", "1e-3", "'schedules.lr.peak' must be a number >= 0, got '1e-3'"),
        ("schedules.lr.peak", -1.0, "'schedules.lr.peak' must be a number >= 0"),
        ("train.epochs", 2.5, "'train.epochs' must be an integer >= 1"),
        ("train.compile", "yes", "'train.compile' must be true or false"),
        ("train.compute_precision", "fp16", "'train.compute_precision' must be one of bf16"),
        ("dino.teacher_normalisation", "softmax", "one of centring, sinkhorn"),
        ("ibot.mask_ratio_min_max", [0.6, 0.2], "'ibot.mask_ratio_min_max' must be [min, max]"),
        ("model.overrides", [1], "'model.overrides' must be a mapping"),
        ("schedules.momentum", 0.99, "'schedules.momentum' must be a mapping"),
        ("crops.hu_clip", [1900, -1000], "'crops.hu_clip' must be [low, high] with low < high"),
        ("crops.global_crops_size", 0, "'crops.global_crops_size' must be >= 1"),
    ],
)
def test_a_bad_key_is_a_one_line_error_naming_it(path, value, message):
    with pytest.raises(VoxelFMError) as caught:
        SSLSettings.from_config(_with(path, value))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_numeric_string_gets_the_yaml_hint():
    with pytest.raises(VoxelFMError, match="write 1.0e-3"):
        SSLSettings.from_config(_with("schedules.lr.end", "1e-6"))


def test_every_default_key_has_a_setting():
    """A key added to the YAML without a field (or the reverse) fails at once."""
    defaults = default_ssl_config()
    settings = SSLSettings.from_config(defaults)
    for section, keys in defaults.items():
        if section == "crops":
            continue
        assert {f.name for f in dataclasses.fields(getattr(settings, section))} == set(keys)
