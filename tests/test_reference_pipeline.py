"""published_voxelfm ``preprocessing: reference``: the rmaguado/VoxelFM inference pipeline
(array as stored, loader clip, background crop, isotropic resample, patch budget, patch
crop, unclipped standardisation, fp32), and the ``precision`` option."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from voxelfm.errors import VoxelFMError
from voxelfm.extract.backbones import build_extractor
from voxelfm.extract.reference_pipeline import (
    background_box,
    isotropic_size,
    max_patches_size,
    patch_crop_box,
    read_stored_array,
    reference_features,
)
from voxelfm.extract.vit import from_input_axes, to_input_axes
from voxelfm.models.vision_transformer import build_vit

MEAN, STD = -573.8, 461.3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(7)
    model = build_vit("tiny", depth=1, layerscale_init=0.1).eval()
    entries = {f"backbone.{name}": t.clone() for name, t in model.state_dict().items()}
    path = tmp_path_factory.mktemp("reference") / "teacher_checkpoint.pth"
    torch.save({"teacher": entries}, path)
    return model, path


def spec(path, **extra):
    return {
        "kind": "published_voxelfm",
        "path": str(path),
        "preset": "tiny",
        "overrides": {"depth": 1, "layerscale_init": 0.1},
        **extra,
    }


def body(shape, seed=0) -> np.ndarray:
    """Air around a noisy box of tissue (so the background crop has something to cut)."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    inner = tuple(slice(n // 4, n - n // 4) for n in shape)
    hu[inner] = rng.normal(100, 600, [s.stop - s.start for s in inner])
    return hu


def test_nifti_is_read_as_stored_ignoring_the_affine_and_clipped(tmp_path):
    data = body((30, 20, 12)) * 2  # values beyond 1900 HU to be clipped
    affine = np.array([[0, -2.0, 0, 10], [-2.0, 0, 0, 5], [0, 0, -3.0, 7], [0, 0, 0, 1]])
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    stored = read_stored_array(path)
    expected = np.clip(np.asarray(nib.load(path).get_fdata()), -1000, 1900).transpose(2, 1, 0)
    np.testing.assert_allclose(stored.hu.numpy(), expected, atol=1e-3)
    assert stored.spacing == (3.0, 2.0, 2.0) and stored.clip == (-1000.0, 1900.0)


def test_steps_match_the_reference_arithmetic():
    assert isotropic_size((20, 512, 512), (2.0, 0.9765625, 0.9765625)) == (41, 512, 512)
    assert isotropic_size((100, 100, 100), (0.5, 0.6, 0.6)) == (67, 80, 80)  # not below 0.75
    assert isotropic_size((10, 20, 30), (1.2, 1.2, 1.2)) == (10, 20, 30)  # equal: untouched
    assert patch_crop_box((31, 28, 15), 14) == (slice(1, 29), slice(0, 28), slice(0, 14))
    # The budget: the largest patch count <= max over five scales around (max / n)^(1/3).
    shape = (500, 500, 500)
    size = max_patches_size(shape, 14, 25_000)
    patches = math.prod(n // 14 for n in size)
    assert patches <= 25_000 < math.prod(n // 14 for n in shape)
    assert patches > 25_000 * 0.9
    hu = torch.full((60, 60, 60), -1000.0)
    hu[15:45, 20:50, 25:55] = 50.0
    # A 30-voxel cube survives the majority filter (over half of each 21^3 cube centred on
    # its voxels); its box widened by 10 voxels (21 // 2) and clipped to the volume.
    assert background_box(hu) == (slice(5, 55), slice(10, 60), slice(15, 60))
    hu[:, :, :] = -1000.0
    hu[20:40, 25:35, 30:50] = 50.0  # 10 voxels thin: never over half of a 21^3 cube
    with pytest.raises(ValueError, match="no body"):
        background_box(hu)


def test_reference_features_of_a_file_follow_the_pipeline(tmp_path, checkpoint):
    model, path = checkpoint
    data = body((48, 40, 32), seed=1)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), scan)
    extractor = build_extractor(spec(path, preprocessing="reference"), "cpu")
    features = reference_features(scan, extractor)
    # By hand: (z, y, x) as stored, clip, crop, 2 mm slices -> 1 mm, patch crop, standardise.
    img = torch.from_numpy(np.clip(data, -1000, 1900).transpose(2, 1, 0).copy())
    box = background_box(img)
    img = img[box]
    size = (img.shape[0] * 2, img.shape[1], img.shape[2])
    img = F.interpolate(img[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    img = img[patch_crop_box(img.shape, 8)]
    torch.testing.assert_close(features.img, img)
    with torch.inference_mode():
        out = model(((img - MEAN) / STD)[None, None])
    torch.testing.assert_close(features.cls, out.x_norm_clstoken[0])
    torch.testing.assert_close(features.patch, out.patch_grid()[0])


def test_reference_mode_on_our_grid_crops_and_maps_tokens_back(checkpoint):
    model, path = checkpoint
    hu = torch.from_numpy(body((48, 40, 32), seed=2))[None, None]
    reference = build_extractor(spec(path, preprocessing="reference"), "cpu")
    assert reference.precision == "fp32" and reference.normalisation.hu_clip == (-1000.0, 1900.0)
    cls, patch = reference(hu)
    zyx = hu[0, 0].permute(2, 1, 0).clamp(-1000, 1900)
    box = background_box(zyx)
    img = zyx[box]
    img = img[patch_crop_box(img.shape, 8)]
    with torch.inference_mode():
        expected = model(((img - MEAN) / STD)[None, None]).x_norm_clstoken
    torch.testing.assert_close(cls, expected)
    assert patch.shape == (1, 6, 5, 4, model.embed_dim)
    # Without crop and budget the reference mode is the canonical mode with the loader clip.
    plain = build_extractor(
        spec(path, preprocessing="reference", crop_background=False, max_patches=None), "cpu"
    )
    canonical = build_extractor(spec(path, normalisation={"hu_clip": [-1000, 1900]}), "cpu")
    for a, b in zip(plain(hu), canonical(hu)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_axial_display_axes_round_trip_and_orientation():
    x = torch.zeros(1, 1, 4, 5, 6)
    x[0, 0, 1, 2, 3] = 1.0  # our (x=1, y=2, z=3)
    seen = to_input_axes(x, "axial_display")
    assert seen.shape == (1, 1, 6, 5, 4)
    assert seen[0, 0, 3, 5 - 1 - 2, 4 - 1 - 1] == 1.0  # slice z, row A->P, column R->L
    tokens = torch.randn(1, 4, 5, 6, 3)
    back = from_input_axes(
        to_input_axes(tokens.movedim(-1, 1), "axial_display").movedim(1, -1), "axial_display"
    )
    torch.testing.assert_close(back, tokens)


def test_options_precision_and_reference_only_keys(checkpoint):
    _, path = checkpoint
    canonical = build_extractor(spec(path, precision="fp32"), "cpu", precision="bf16")
    assert canonical.describe()["precision"] == "fp32"
    with pytest.raises(VoxelFMError, match="precision must be one of"):
        build_extractor(spec(path, precision="fp16"), "cpu")
    with pytest.raises(VoxelFMError, match="preprocessing must be one of"):
        build_extractor(spec(path, preprocessing="native"), "cpu")
    with pytest.raises(VoxelFMError, match="apply to preprocessing: reference"):
        build_extractor(spec(path, max_patches=100), "cpu")
    description = build_extractor(spec(path, preprocessing="reference"), "cpu").describe()
    assert description["preprocessing"] == "reference"
    assert description["reference_pipeline"]["max_patches"] == 25_000


@pytest.mark.realdata
def test_dicom_series_is_read_in_the_reference_loaders_order(real_data):
    pydicom = pytest.importorskip("pydicom")
    folder = real_data / "totalseg" / "example_ct_dicom"
    slices = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]
    slices.sort(key=lambda d: float(d.ImagePositionPatient[2]))  # ascending z, as its loader
    hu = np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices]
    )
    stored = read_stored_array(folder)
    np.testing.assert_allclose(stored.hu.numpy(), np.clip(hu, -1000, 1000), atol=1e-3)
    rows, columns = (float(v) for v in slices[0].PixelSpacing)
    gap = abs(float(slices[1].ImagePositionPatient[2]) - float(slices[0].ImagePositionPatient[2]))
    np.testing.assert_allclose(stored.spacing, (gap, rows, columns), atol=1e-4)
