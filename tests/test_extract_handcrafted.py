"""The handcrafted baseline is exact: histogram, statistics and tissue fractions per volume
and per block, over valid voxels only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxelfm.extract.backbones import build_extractor
from voxelfm.extract.handcrafted import HandcraftedExtractor


def three_tissue_volume() -> np.ndarray:
    """16^3: x < 8 air (-1000), else y < 8 soft tissue (40 HU), else bone (1000 HU)."""
    volume = np.full((16, 16, 16), -1000.0, dtype=np.float32)
    volume[8:, :8] = 40.0
    volume[8:, 8:] = 1000.0
    return volume


def expected_vector(values: np.ndarray, bins: int) -> np.ndarray:
    values = values.astype(np.float64).ravel()
    hist, _ = np.histogram(values, bins=bins, range=(-1024, 3071))
    fractions = [
        np.mean(values < -900),
        np.mean((values >= -900) & (values < -200)),
        np.mean((values >= -200) & (values < -30)),
        np.mean((values >= -30) & (values < 300)),
        np.mean(values >= 300),
    ]
    return np.concatenate(
        [
            hist / values.size,
            [values.mean() / 1000, values.std() / 1000],
            np.percentile(values, [5, 25, 50, 75, 95]) / 1000,
            fractions,
        ]
    )


def test_handcrafted_features_are_exact_on_a_constructed_volume():
    extractor = build_extractor({"kind": "handcrafted", "bins": 32, "patch_size": 8}, "cpu")
    names = extractor.feature_names
    volume = three_tissue_volume()
    cls, patch = extractor(torch.from_numpy(volume)[None, None])
    vector = dict(zip(names, cls[0].tolist()))
    assert vector["frac_air"] == pytest.approx(0.5)
    assert vector["frac_soft"] == pytest.approx(0.25)
    assert vector["frac_bone"] == pytest.approx(0.25)
    assert vector["frac_lung"] == vector["frac_fat"] == 0.0
    assert vector["mean_khu"] == pytest.approx((-500 + 10 + 250) / 1000)
    np.testing.assert_allclose(cls[0].numpy(), expected_vector(volume, 32), rtol=1e-6, atol=1e-7)
    # Patch tokens: the same vector per 8^3 block.
    assert patch.shape == (1, 2, 2, 2, extractor.embed_dim)
    for i, j, k in np.ndindex(2, 2, 2):
        block = volume[8 * i : 8 * i + 8, 8 * j : 8 * j + 8, 8 * k : 8 * k + 8]
        np.testing.assert_allclose(
            patch[0, i, j, k].numpy(), expected_vector(block, 32), rtol=1e-6, atol=1e-7
        )
    air_block = dict(zip(names, patch[0, 0, 0, 0].tolist()))
    assert (
        air_block["frac_air"] == 1.0 and air_block["std_khu"] == 0.0 and air_block["hist_0"] == 1.0
    )


def test_handcrafted_ignores_padding_voxels_and_zeroes_empty_blocks():
    extractor = HandcraftedExtractor(bins=8, patch_size=4)
    rng = np.random.default_rng(0)
    real = rng.normal(0, 300, (6, 4, 4)).astype(np.float32)
    padded = np.full((8, 4, 4), -1024.0, dtype=np.float32)
    padded[:6] = real
    valid = np.zeros_like(padded, dtype=bool)
    valid[:6] = True
    cls, patch = extractor(
        torch.from_numpy(padded)[None, None], torch.from_numpy(valid)[None, None]
    )
    np.testing.assert_allclose(cls[0].numpy(), expected_vector(real, 8), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        patch[0, 1, 0, 0].numpy(), expected_vector(real[4:6], 8), rtol=1e-5, atol=1e-6
    )
    empty = torch.zeros((1, 1, 4, 4, 4), dtype=torch.bool)
    cls, patch = extractor(torch.zeros((1, 1, 4, 4, 4)), empty)
    assert not cls.any() and not patch.any()
