"""extract_features: determinism, sliding vs whole equivalence, patch-grid geometry, padding,
sources (volume, array, NIfTI file)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from voxelfm.extract.backbones import build_extractor
from voxelfm.extract.extractor import extract_features, window_starts
from voxelfm.extract.interface import FeatureExtractor
from voxelfm.io.preprocess import preprocess_scan
from voxelfm.volume import CanonicalVolume


@pytest.fixture(scope="module")
def vit():
    """A random tiny ViT (patch 8), the cheapest real backbone."""
    return build_extractor(
        {"kind": "random_init", "preset": "tiny", "overrides": {"depth": 1}, "seed": 0}, "cpu"
    )


@pytest.fixture(scope="module")
def handcrafted():
    return build_extractor({"kind": "handcrafted", "bins": 16, "patch_size": 8}, "cpu")


def ct_volume(shape=(20, 17, 9), seed=0, spacing=(1.5, 1.5, 2.0), origin=(-30.0, 12.5, 80.0)):
    rng = np.random.default_rng(seed)
    image = rng.normal(-200, 500, shape).round().clip(-1024, 3071).astype(np.int16)
    return CanonicalVolume(image, spacing=spacing, origin=origin)


def assert_same(a, b):
    np.testing.assert_array_equal(a.cls, b.cls)
    np.testing.assert_array_equal(a.pooled, b.pooled)
    np.testing.assert_array_equal(a.patch, b.patch)
    np.testing.assert_array_equal(a.grid_affine, b.grid_affine)
    assert a.grid_shape == b.grid_shape


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_extraction_is_deterministic(vit, mode):
    volume = ct_volume()
    options = {"mode": mode, "window": 16, "overlap": 0.5} if mode == "sliding" else {"mode": mode}
    first = extract_features(volume, vit, **options)
    second = extract_features(volume, vit, **options)
    assert_same(first, second)
    rebuilt = build_extractor(vit.config, "cpu")  # same seed, rebuilt from scratch
    assert_same(first, extract_features(volume, rebuilt, **options))


@pytest.mark.parametrize("window", [24, 32, 64, (24, 24, 16)])
def test_sliding_equals_whole_when_the_volume_fits_in_one_window(vit, window):
    volume = ct_volume()  # grid (3, 3, 2): 24 x 24 x 16 voxels once padded
    whole = extract_features(volume, vit, mode="whole")
    sliding = extract_features(volume, vit, mode="sliding", window=window, batch_size=2)
    assert sliding.mode == "sliding" and sliding.n_windows == 1
    assert_same(whole, sliding)


def test_sliding_on_a_larger_volume_keeps_the_whole_volume_grid(vit):
    volume = ct_volume(shape=(40, 30, 20))
    whole = extract_features(volume, vit, mode="whole")
    sliding = extract_features(volume, vit, mode="sliding", window=16, overlap=0.5, batch_size=3)
    assert whole.grid_shape == sliding.grid_shape == (5, 4, 3)
    assert sliding.patch.shape == (5, 4, 3, vit.embed_dim)
    assert sliding.n_windows == 4 * 3 * 2
    for features in (whole, sliding):
        assert np.isfinite(features.cls).all() and np.isfinite(features.patch).all()
    np.testing.assert_array_equal(sliding.grid_affine, whole.grid_affine)
    np.testing.assert_allclose(
        sliding.pooled, sliding.patch.reshape(-1, vit.embed_dim).mean(0), atol=1e-6
    )


def test_sliding_equals_whole_for_position_independent_tokens(handcrafted):
    """Handcrafted block tokens do not depend on context, so every window agrees: sliding
    must then reproduce whole-volume extraction exactly (averaging and placement check)."""
    volume = ct_volume(shape=(40, 30, 20))
    whole = extract_features(volume, handcrafted, mode="whole")
    sliding = extract_features(volume, handcrafted, mode="sliding", window=16, overlap=0.5)
    np.testing.assert_array_equal(sliding.patch, whole.patch)
    # Windows that tile the volume (no overlap): the coverage-weighted mean of the window
    # vectors is the whole-volume histogram, mean and tissue fractions.
    volume = ct_volume(shape=(32, 30, 16))
    whole = extract_features(volume, handcrafted, mode="whole")
    tiled = extract_features(volume, handcrafted, mode="sliding", window=16, overlap=0.0)
    assert tiled.n_windows == 2 * 2 * 1
    names = handcrafted.feature_names
    additive = [i for i, n in enumerate(names) if n.startswith(("hist_", "frac_"))]
    additive.append(names.index("mean_khu"))
    np.testing.assert_allclose(tiled.cls[additive], whole.cls[additive], atol=1e-6)


def test_auto_mode_slides_only_above_the_patch_budget(vit):
    volume = ct_volume(shape=(40, 30, 20))  # 5 * 4 * 3 = 60 patches
    assert extract_features(volume, vit, mode="auto", max_patches=60).mode == "whole"
    assert extract_features(volume, vit, mode="auto").mode == "whole"
    over = extract_features(volume, vit, mode="auto", max_patches=27, batch_size=8)
    assert over.mode == "sliding" and over.grid_shape == (5, 4, 3)
    assert over.n_windows == 2 * 2 * 1  # 3^3-patch windows, stride 2 (rounded 1.5)


def test_grid_affine_maps_tokens_to_patch_centres(vit):
    volume = ct_volume()
    features = extract_features(volume, vit, mode="whole")
    p = vit.patch_size
    first_centre = volume.affine @ np.array([(p - 1) / 2] * 3 + [1.0])
    np.testing.assert_allclose(features.grid_affine @ [0, 0, 0, 1], first_centre)
    # Every token: the mean world position of its block's voxel centres.
    centres = features.token_centres()
    assert centres.shape == (3, 3, 2, 3)
    block = np.stack(np.meshgrid(*(np.arange(p) + p * n for n in (2, 1, 1)), indexing="ij"), -1)
    np.testing.assert_allclose(centres[2, 1, 1], volume.voxel_to_world(block).mean((0, 1, 2)))


def test_whole_mode_pads_the_high_end_with_air(vit):
    volume = ct_volume(shape=(20, 17, 9))
    features = extract_features(volume, vit, mode="whole")
    assert features.grid_shape == (3, 3, 2) and features.volume_shape == (20, 17, 9)
    padded = np.full((24, 24, 16), -1024, dtype=np.int16)
    padded[:20, :17, :9] = volume.image
    explicit = extract_features(
        CanonicalVolume(padded, volume.spacing, volume.origin), vit, mode="whole"
    )
    assert_same(features, explicit)


def test_window_validation(vit):
    volume = ct_volume()
    with pytest.raises(ValueError, match="multiples of the patch size"):
        extract_features(volume, vit, mode="sliding", window=12)
    with pytest.raises(ValueError, match="needs a window or a max_patches"):
        extract_features(volume, vit, mode="sliding")
    with pytest.raises(ValueError, match="over the max_patches budget"):
        extract_features(volume, vit, mode="sliding", window=32, max_patches=8)
    with pytest.raises(ValueError, match="overlap"):
        extract_features(volume, vit, mode="sliding", window=16, overlap=1.0)


def test_window_starts_cover_the_axis_and_end_flush():
    assert window_starts(5, 2, 1) == [0, 1, 2, 3]
    assert window_starts(5, 2, 2) == [0, 2, 3]
    assert window_starts(4, 2, 2) == [0, 2]
    assert window_starts(3, 5, 2) == [0]


def test_arrays_and_tensors_are_sources_too(vit):
    volume = ct_volume()
    from_volume = extract_features(volume, vit, mode="whole")
    from_array = extract_features(
        volume.image, vit, spacing=volume.spacing, origin=volume.origin, mode="whole"
    )
    from_tensor = extract_features(
        torch.from_numpy(volume.image.astype(np.float32)),
        vit,
        spacing=volume.spacing,
        origin=volume.origin,
    )
    assert_same(from_volume, from_array)
    assert_same(from_volume, from_tensor)


def test_a_nifti_file_is_preprocessed_as_the_store_is(vit, tmp_path):
    rng = np.random.default_rng(3)
    data = rng.normal(-300, 400, (14, 12, 10)).round().astype(np.int16)
    affine = np.diag([-0.8, 0.9, 2.5, 1.0])  # LAS, anisotropic: reoriented and resampled
    affine[:3, 3] = (40.0, -20.0, 10.0)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    from_file = extract_features(path, vit, mode="whole")
    preprocessed = preprocess_scan(path)  # the store's default spacing
    assert_same(from_file, extract_features(preprocessed, vit, mode="whole"))
    assert from_file.meta["source_format"] == "nifti"
    assert from_file.spacing == (1.5, 1.5, 1.5)
    assert from_file.volume_shape == preprocessed.image.shape


def test_an_extractor_without_patch_tokens_gives_global_vectors_only(vit):
    class GlobalOnly(FeatureExtractor):
        kind = "global_only_test"

        def __init__(self):
            self.name, self.embed_dim, self.patch_size = "global", 2, None
            self.device, self.config = torch.device("cpu"), {"kind": self.kind}

        def forward(self, hu, valid=None):
            flat = hu.flatten(1)
            return torch.stack([flat.mean(1), flat.std(1)], 1), None

    features = extract_features(ct_volume(), GlobalOnly())
    assert features.patch is None and features.grid_affine is None
    np.testing.assert_array_equal(features.cls, features.pooled)
    with pytest.raises(ValueError, match="no patch grid"):
        extract_features(ct_volume(), GlobalOnly(), mode="sliding", window=8)
