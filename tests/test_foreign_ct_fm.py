"""CT-FM adapter: MONAI SegResEncoder, release key layout, SPL preprocessing, token geometry."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.extract import extract_features
from voxelfm.extract.backbones import build_extractor
from voxelfm.extract.foreign import ct_fm
from voxelfm.extract.foreign.common import RANDOM_WEIGHTS_LABEL, read_weight_file

SMALL = {"init_filters": 4, "blocks_down": [1, 1, 1, 1, 1]}  # 64-d last stage, stride 16


def small_spec(**extra):
    return {"kind": "ct_fm", "overrides": SMALL, **extra}


def volume(shape=(32, 48, 32), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((1, 1, *shape), generator=generator) * 2000 - 1000


def test_full_architecture_parameter_count_and_width():
    with torch.device("meta"):
        model = ct_fm.build_encoder()
    # MONAI SegResEncoder(init_filters=32, blocks_down=(1, 2, 2, 4, 4)): 77.76 M parameters.
    assert sum(p.numel() for p in model.parameters()) == 77_760_992
    assert model.init_filters * 2 ** (len(model.blocks_down) - 1) == 512


def test_full_model_embedding_size_through_extract_features():
    extractor = build_extractor({"kind": "ct_fm", "random_weights": True}, "cpu")
    assert extractor.describe()["weights"] == RANDOM_WEIGHTS_LABEL
    hu = np.full((32, 32, 16), -1000.0, dtype=np.float32)
    hu[8:24, 8:24, 4:12] = 40.0
    features = extract_features(hu, extractor, spacing=(1.0, 1.0, 3.0), mode="whole")
    assert features.cls.shape == (512,)
    assert features.patch.shape == (2, 2, 1, 512)
    assert np.isfinite(features.cls).all()


def test_release_layout_loads_with_identical_outputs(tmp_path):
    reference = build_extractor(small_spec(random_weights=True, seed=3), "cpu")
    # The full-SegResNet release prefixes encoder keys with "encoder." and has a decoder.
    state = {f"encoder.{k}": v for k, v in reference.model.state_dict().items()}
    state["up_layers.0.conv.weight"] = torch.zeros(2, 2)
    path = tmp_path / "ct_fm_segresnet.pt"
    torch.save({"state_dict": state}, path)
    loaded = build_extractor(small_spec(path=str(path), seed=7), "cpu")
    other = build_extractor(small_spec(random_weights=True, seed=7), "cpu")
    x = volume()
    cls_ref, patch_ref = reference(x)
    cls, patch = loaded(x)
    torch.testing.assert_close(cls, cls_ref, rtol=0, atol=0)
    torch.testing.assert_close(patch, patch_ref, rtol=0, atol=0)
    assert not torch.allclose(other(x)[0], cls_ref)
    assert len(loaded.describe()["weights"]) == 64  # sha256 of the file


def test_safetensors_release_file_without_the_package(tmp_path):
    reference = build_extractor(small_spec(random_weights=True, seed=3), "cpu")
    state = {k: v.contiguous() for k, v in reference.model.state_dict().items()}
    header, blobs, offset = {}, [], 0
    dtype_names = {torch.float32: "F32", torch.int64: "I64"}
    for name, tensor in state.items():
        blob = tensor.numpy().tobytes()
        header[name] = {
            "dtype": dtype_names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))
    read = read_weight_file(path, "CT-FM", "x")
    assert set(read) == set(state)
    for name, tensor in state.items():
        assert torch.equal(read[name], tensor)
    loaded = build_extractor(small_spec(path=str(path)), "cpu")
    x = volume()
    torch.testing.assert_close(loaded(x)[0], reference(x)[0], rtol=0, atol=0)


def test_missing_file_and_wrong_state_dict_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="CT-FM weights not found; download") as error:
        build_extractor(small_spec(path=str(tmp_path / "absent.safetensors")), "cpu")
    assert "\n" not in str(error.value)
    reference = build_extractor(small_spec(random_weights=True), "cpu")
    state = reference.model.state_dict()
    state.pop("conv_init.weight")
    state["head.extra"] = torch.zeros(1)
    state["bogus.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(InputError, match="not CT-FM image-encoder weights") as error:
        build_extractor(small_spec(path=str(path)), "cpu")
    message = str(error.value)
    assert "\n" not in message and "conv_init.weight" in message and "bogus.weight" in message
    assert str(path) in message
    with pytest.raises(VoxelFMError, match="missing path"):
        build_extractor({"kind": "ct_fm"}, "cpu")


def test_preprocessing_orientation_spl_and_intensity():
    hu = torch.full((1, 4, 5, 6), -1024.0)
    hu[0, 1, 2, 3] = 512.0  # marker at our (x=1, y=2, z=3)
    hu[0, 0, 0, 0] = 3000.0
    x = ct_fm.preprocess(hu)
    assert x.shape == (1, 6, 5, 4)  # (S, P, L)
    # S index = z; P index counts from anterior's opposite end; L index from the right.
    assert x[0, 3, 5 - 1 - 2, 4 - 1 - 1] == pytest.approx(0.5)  # (512 + 1024) / 3072
    assert x[0, 0, 4, 3] == 1.0  # clipped at 2048 HU
    assert x.min() == 0.0 and (x > 0).sum() == 2


def test_patch_tokens_are_the_feature_map_on_our_axes():
    extractor = build_extractor(small_spec(random_weights=True, crop_foreground=False), "cpu")
    hu = volume((32, 48, 16))
    cls, patch = extractor(hu)
    with torch.inference_mode():
        features = extractor.model(ct_fm.preprocess(hu[0])[None])[-1][0]  # (C, S, P, L)
    expected = features.flip(2, 3).permute(3, 2, 1, 0)  # -> (X, Y, Z, C)
    torch.testing.assert_close(patch[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls[0], features.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)


def test_foreground_crop_ignores_padding_and_air_border():
    extractor = build_extractor(small_spec(random_weights=True, preprocessing="model_card"), "cpu")
    body = volume((32, 32, 16), seed=1)
    padded = torch.full((1, 1, 48, 48, 32), -1024.0)
    padded[..., 8:40, 8:40, 8:24] = body
    # CropForeground keeps only voxels above -1024 HU: the body box, wherever it sits.
    cls_body, _ = extractor(body)
    cls_padded, patch = extractor(padded)
    torch.testing.assert_close(cls_padded, cls_body, rtol=1e-5, atol=1e-5)
    assert patch.shape == (1, 3, 3, 2, 64)


def test_default_is_the_pretraining_recipe_and_the_card_is_an_option():
    """CT-FM pre-trained at SPACING [3, 1, 1] (SPL) = (1, 1, 3) mm on our (X, Y, Z)."""
    pretraining = build_extractor(small_spec(random_weights=True), "cpu")
    assert pretraining.spacing_mm == (1.0, 1.0, 3.0)
    assert pretraining.describe()["preprocessing"]["variant"] == "pretraining"
    card = build_extractor(small_spec(random_weights=True, preprocessing="model_card"), "cpu")
    assert card.spacing_mm is None
    with pytest.raises(VoxelFMError, match="preprocessing must be one of"):
        build_extractor(small_spec(random_weights=True, preprocessing="other"), "cpu")


def test_pretraining_crops_raw_hu_above_zero_before_scaling():
    """CropForeground runs on the raw HU (> 0 HU), not on the scaled image (> -1024 HU)."""
    tissue = torch.full((1, 1, 48, 48, 32), -500.0)  # fat/lung-like: above -1024, below 0
    body = volume((16, 32, 16), seed=2).abs() + 10.0  # all above 0 HU
    tissue[..., 16:32, 8:40, 8:24] = body
    pretraining = build_extractor(small_spec(random_weights=True), "cpu")
    x, maps = pretraining.prepare(tissue[0])
    assert x.shape == (1, 16, 32, 16)  # (S, P, L) of the HU > 0 box only
    torch.testing.assert_close(x, ct_fm.preprocess(body[0]))
    corner = (16, 8, 8)  # our (x, y, z) of the body's first voxel -> model (S, P, L)
    assert [m(corner[m.source]) for m in maps] == [0, 31, 15]
    card = build_extractor(small_spec(random_weights=True, preprocessing="model_card"), "cpu")
    assert card.prepare(tissue[0])[0].shape == (1, 32, 48, 48)  # everything is above -1024


def test_pretraining_resamples_another_spacing_to_one_one_three():
    spec = small_spec(random_weights=True, crop_foreground=False, spacing_mm=[2.0, 2.0, 6.0])
    extractor = build_extractor(spec, "cpu")
    hu = volume((16, 32, 16), seed=4)
    x, _ = extractor.prepare(hu[0])
    assert x.shape == (1, 32, 64, 32)  # S 16 * 6/3, P 32 * 2/1, L 16 * 2/1
    spl = ct_fm.to_spl(hu[0])
    expected = torch.nn.functional.interpolate(
        spl[None], size=(32, 64, 32), mode="trilinear", align_corners=False
    )[0]
    torch.testing.assert_close(x, ct_fm.scale_intensity(expected))
    _, patch = extractor(hu)
    assert patch.shape == (1, 1, 2, 1, 64)


def test_tokens_are_feature_cells_only_for_multiples_of_sixteen_in_x_and_y():
    extractor = build_extractor(small_spec(random_weights=True, crop_foreground=False), "cpu")
    for shape, exact in (((32, 48, 16), True), ((40, 48, 16), False)):
        hu = volume(shape, seed=5)
        _, patch = extractor(hu)
        with torch.inference_mode():
            features = extractor.model(ct_fm.preprocess(hu[0])[None])[-1][0]
        cells = features.flip(2, 3).permute(3, 2, 1, 0)[: patch.shape[1], : patch.shape[2]]
        assert torch.allclose(patch[0], cells, atol=1e-5) == exact
