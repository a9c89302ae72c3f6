"""Merlin adapter: I3D ResNet-152, release key layout, RAS preprocessing, token geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxelfm.errors import InputError
from voxelfm.extract import extract_features
from voxelfm.extract.backbones import build_extractor
from voxelfm.extract.foreign import merlin
from voxelfm.extract.foreign.common import RANDOM_WEIGHTS_LABEL, AxisMap

SMALL = {"layers": [1, 1, 1, 1], "width": 4, "num_phenotypes": 5, "projection_dim": 6}
SMALL_INPUT = [64, 64, 32]


def small_spec(**extra):
    return {"kind": "merlin", "overrides": SMALL, "input_size": SMALL_INPUT, **extra}


def volume(shape=(32, 48, 32), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((1, 1, *shape), generator=generator) * 2000 - 1000


def test_full_architecture_parameter_count():
    with torch.device("meta"):
        model = merlin.MerlinImageEncoder()
    # torchvision ResNet-152 (60,192,808 parameters) without its fc (2,049,000), every 3x3
    # conv inflated to 3x3x3 (+2 * 9 * planes^2 per block) and the stem to 3x7x7
    # (+2 * 64 * 3 * 49), plus the phenotype (2048 -> 1692) and contrastive (2048 -> 512) heads.
    inflation = (
        2
        * 9
        * sum(blocks * planes**2 for blocks, planes in zip((3, 8, 36, 3), (64, 128, 256, 512)))
    )
    expected = (
        60_192_808 - 2_049_000 + inflation + 2 * 64 * 3 * 49 + 2048 * 1692 + 1692 + 2048 * 512 + 512
    )
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.feature_dim == 2048 and model.contrastive_head.out_channels == 512


def test_full_model_embedding_sizes_through_extract_features():
    hu = np.full((24, 24, 12), -1000.0, dtype=np.float32)
    hu[6:18, 6:18, 3:9] = 40.0
    for embedding, width in (("image", 2048), ("contrastive", 512)):
        spec = {"kind": "merlin", "random_weights": True, "embedding": embedding}
        extractor = build_extractor({**spec, "input_size": [32, 32, 16]}, "cpu")
        assert extractor.spacing_mm == (1.5, 1.5, 3.0)
        assert extractor.describe()["weights"] == RANDOM_WEIGHTS_LABEL
        features = extract_features(hu, extractor, mode="whole")
        assert features.cls.shape == (width,)
        assert features.patch.shape == (2, 2, 1, width)
        if embedding == "contrastive":  # L2-normalised as Merlin's CLIP forward
            assert np.linalg.norm(features.cls) == pytest.approx(1.0, abs=1e-5)


def test_release_layout_loads_with_identical_outputs(tmp_path):
    reference = build_extractor(small_spec(random_weights=True, seed=3), "cpu")
    state = {f"encode_image.i3_resnet.{k}": v for k, v in reference.model.state_dict().items()}
    state["encode_text.linear_layer.weight"] = torch.zeros(512, 768)
    state["encode_text.text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(3, 4)
    state["logit_scale"] = torch.ones(())
    path = tmp_path / "merlin.pt"
    torch.save(state, path)
    loaded = build_extractor(small_spec(path=str(path), seed=7), "cpu")
    other = build_extractor(small_spec(random_weights=True, seed=7), "cpu")
    x = volume()
    cls_ref, patch_ref = reference(x)
    cls, patch = loaded(x)
    torch.testing.assert_close(cls, cls_ref, rtol=0, atol=0)
    torch.testing.assert_close(patch, patch_ref, rtol=0, atol=0)
    assert not torch.allclose(other(x)[0], cls_ref)
    assert len(loaded.describe()["weights"]) == 64


def test_missing_file_and_wrong_state_dict_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="Merlin weights not found; download") as error:
        build_extractor(small_spec(path=str(tmp_path / "absent.pt")), "cpu")
    assert "\n" not in str(error.value)
    reference = build_extractor(small_spec(random_weights=True), "cpu")
    state = reference.model.state_dict()
    state["layer1.0.conv2.weight"] = torch.zeros(1, 1, 1, 1, 1)
    path = tmp_path / "wrong_shape.pt"
    torch.save(state, path)
    with pytest.raises(InputError, match="Merlin .*shape mismatches") as error:
        build_extractor(small_spec(path=str(path)), "cpu")
    assert "\n" not in str(error.value) and "layer1.0.conv2.weight" in str(error.value)
    state.pop("conv1.weight")
    torch.save(state, path)
    with pytest.raises(InputError, match="not Merlin image-encoder weights.*conv1.weight"):
        build_extractor(small_spec(path=str(path)), "cpu")


def test_preprocessing_window_and_centre_pad_crop():
    hu = torch.full((1, 10, 20, 30), -1024.0)
    hu[0, 2, 3, 4] = 0.0  # marker -> 0.5
    hu[0, 9, 19, 29] = 2500.0  # clipped to 1000 HU -> 1
    maps = [AxisMap(source=axis) for axis in range(3)]
    x = merlin.preprocess(hu, (16, 16, 32), maps)
    assert x.shape == (1, 16, 16, 32)
    # MONAI SpatialPad puts (16 - 10) // 2 = 3 before; CenterSpatialCrop starts at
    # 20 // 2 - 16 // 2 = 2; depth pads (32 - 30) // 2 = 1 before. RAS axes unchanged.
    assert x[0, 2 + 3, 3 - 2, 4 + 1] == 0.5
    assert x[0, 9 + 3, 19 - 2 - 4, 29 + 1] == 0.0  # row 19 of Y was cropped away
    assert x[0, 12, 15, 30] == 0.0 and x.max() == 0.5
    assert [m(v) for m, v in zip(maps, (2, 3, 4))] == [5, 1, 5]


def test_global_embedding_is_the_pooled_feature_map_and_padding_is_ignored():
    extractor = build_extractor(small_spec(random_weights=True), "cpu")
    hu = volume((40, 40, 20))
    padded = torch.full((1, 1, 48, 48, 32), -1024.0)
    padded[..., :40, :40, :20] = hu
    valid = torch.zeros_like(padded, dtype=torch.bool)
    valid[..., :40, :40, :20] = True
    cls, patch = extractor(padded, valid)
    with torch.inference_mode():
        x = merlin.preprocess(hu[0], SMALL_INPUT)[None]
        features = extractor.model.feature_map(x)
    torch.testing.assert_close(cls[0], features.mean(dim=(2, 3, 4))[0], rtol=1e-5, atol=1e-5)
    assert patch.shape == (1, 3, 3, 2, extractor.embed_dim)


def test_patch_tokens_sample_the_feature_map_at_token_centres():
    extractor = build_extractor(small_spec(random_weights=True), "cpu")
    hu = volume(tuple(SMALL_INPUT))  # exactly the model input: no crop, no pad
    _, patch = extractor(hu)
    with torch.inference_mode():
        features = extractor.model.feature_map(merlin.preprocess(hu[0], SMALL_INPUT)[None])[0]
    assert features.shape[1:] == (2, 2, 2) and patch.shape[1:4] == (4, 4, 2)
    # 16-voxel tokens: in depth (stride 16) token k is cell k. In plane (stride 32, cells
    # centred on voxels 15.5 and 47.5) token i centred on 16 i + 7.5 sits at cell coordinate
    # i / 2 - 0.25: tokens 0 and 3 repeat the border cells, 1 and 2 mix them 3:1 and 1:3.
    c0, c1 = features[:, 0, 0], features[:, 1, 0]  # (C, depth) at in-plane row (i, 0)
    for i, expected in enumerate((c0, 0.75 * c0 + 0.25 * c1, 0.25 * c0 + 0.75 * c1, c1)):
        torch.testing.assert_close(patch[0, i, 0].T, expected, rtol=1e-4, atol=1e-5)
