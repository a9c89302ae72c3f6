"""RadFM adapter: 3D ViT vision encoder, release key layout, preprocessing, token geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxelfm.errors import InputError
from voxelfm.extract import extract_features
from voxelfm.extract.backbones import build_extractor
from voxelfm.extract.foreign import radfm
from voxelfm.extract.foreign.common import RANDOM_WEIGHTS_LABEL, AxisMap

SMALL = {
    "image_size": 64,
    "frames": 32,
    "image_patch_size": 16,
    "dim": 48,
    "depth": 2,
    "heads": 2,
    "dim_head": 8,
    "mlp_dim": 32,
}


def small_spec(**extra):
    return {"kind": "radfm", "overrides": SMALL, "image_size": 64, "max_frames": 16, **extra}


def volume(shape=(32, 48, 32), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((1, 1, *shape), generator=generator) * 2000 - 1000


def test_full_architecture_parameter_count():
    with torch.device("meta"):
        model = radfm.RadFMViT3D()
    dim, mlp, inner, patch_dim = 768, 2048, 8 * 64, 3 * 32 * 32 * 4
    block = 2 * 2 * dim + dim * 3 * inner + inner * dim + dim + dim * mlp + mlp + mlp * dim + dim
    expected = (
        2 * patch_dim  # LayerNorm(patch_dim)
        + patch_dim * dim
        + dim  # Linear(patch_dim, dim)
        + 2 * dim  # LayerNorm(dim)
        + (16 + 16 + 128) * (dim // 3)  # position tables
        + 12 * block
    )
    assert sum(p.numel() for p in model.parameters()) == expected == 66_208_000


def test_full_model_embedding_size_through_extract_features():
    # The released architecture, fed a small in-plane size so the test stays fast.
    spec = {"kind": "radfm", "random_weights": True, "image_size": 64, "max_frames": 8}
    extractor = build_extractor(spec, "cpu")
    assert extractor.embed_dim == 768
    assert extractor.describe()["weights"] == RANDOM_WEIGHTS_LABEL
    hu = np.full((32, 32, 16), -1000.0, dtype=np.float32)
    hu[8:24, 8:24, 4:12] = 40.0
    features = extract_features(hu, extractor, spacing=(1.5, 1.5, 1.5), mode="whole")
    assert features.cls.shape == (768,)
    assert features.patch.shape == (2, 2, 1, 768)


def test_release_layout_loads_with_identical_outputs(tmp_path):
    reference = build_extractor(small_spec(random_weights=True, seed=3), "cpu")
    state = {
        f"embedding_layer.vision_encoder.{k}": v for k, v in reference.model.state_dict().items()
    }
    state["lang_model.model.embed_tokens.weight"] = torch.zeros(4, 4)
    state["embedding_layer.perceiver.latents"] = torch.zeros(32, 48)
    state["embedding_layer.fc.weight"] = torch.zeros(4, 48)
    state["embedding_layer.weight"] = torch.zeros(4, 4)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    loaded = build_extractor(small_spec(path=str(path), seed=7), "cpu")
    other = build_extractor(small_spec(random_weights=True, seed=7), "cpu")
    x = volume()
    cls_ref, patch_ref = reference(x)
    cls, patch = loaded(x)
    torch.testing.assert_close(cls, cls_ref, rtol=0, atol=0)
    torch.testing.assert_close(patch, patch_ref, rtol=0, atol=0)
    assert not torch.allclose(other(x)[0], cls_ref)


def test_missing_file_and_wrong_state_dict_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="RadFM weights not found; download") as error:
        build_extractor(small_spec(path=str(tmp_path / "absent.bin")), "cpu")
    assert "\n" not in str(error.value)
    reference = build_extractor(small_spec(random_weights=True), "cpu")
    state = reference.model.state_dict()
    state.pop("pos_embedding.dep_embed.weight")
    path = tmp_path / "wrong.bin"
    torch.save(state, path)
    with pytest.raises(InputError, match="not RadFM image-encoder weights.*dep_embed") as error:
        build_extractor(small_spec(path=str(path)), "cpu")
    assert "\n" not in str(error.value)


def test_patch_embedding_layout_matches_an_explicit_loop():
    torch.manual_seed(0)
    model = radfm.RadFMViT3D(**{**SMALL, "depth": 0}).eval()
    x = torch.rand(1, 3, 32, 16, 8)
    with torch.inference_mode():
        tokens = model(x)  # depth 0: just patch embedding + position
        h, w, d = 2, 1, 2
        for i in range(h):
            for j in range(w):
                for k in range(d):
                    block = x[0, :, 16 * i : 16 * i + 16, 16 * j : 16 * j + 16, 4 * k : 4 * k + 4]
                    flat = block.permute(1, 2, 3, 0).reshape(-1)  # (p1 p2 pf c)
                    position = torch.cat(
                        [
                            model.pos_embedding.row_embed.weight[(i + 1) * (4 // h) - 1],
                            model.pos_embedding.col_embed.weight[(j + 1) * (4 // w) - 1],
                            model.pos_embedding.dep_embed.weight[(k + 1) * (8 // d) - 1],
                        ]
                    )
                    expected = model.to_patch_embedding(flat[None])[0] + position
                    torch.testing.assert_close(tokens[0, i, j, k], expected)


def test_preprocessing_axes_and_intensity():
    hu = torch.full((1, 8, 8, 8), -1000.0)
    hu[0, 1, 2, 3] = 1000.0  # marker at our (x=1, y=2, z=3)
    maps = [AxisMap(source=1), AxisMap(source=0), AxisMap(source=2)]
    x = radfm.preprocess(hu, image_size=8, max_frames=64, maps=maps)
    assert x.shape == (3, 8, 8, 8)  # 8 slices: already a multiple of 4, no resize at all
    # rows anterior -> posterior (our Y reversed), columns right -> left (X reversed)
    assert x[0, 7 - 2, 7 - 1, 3] == 1.0 and x.sum() == 3.0  # min-max: marker 1, rest 0
    assert torch.equal(x[0], x[2])
    assert [m(v) for m, v in zip(maps, (2, 1, 3))] == [5, 6, 3]
    windowed = radfm.preprocess(hu, image_size=8, hu_window=(-1000.0, 3000.0))
    assert windowed[0, 5, 6, 3] == pytest.approx(0.5)
    assert radfm.target_depth(300) == 64 and radfm.target_depth(1) == 4
    resized = radfm.preprocess(torch.zeros(1, 20, 30, 11), image_size=16, max_frames=64)
    assert resized.shape == (3, 16, 16, 12)


def release_target_depth(slices: int) -> int:
    """The loop of the release's collate (src/train.py, src/test.py), written out as is."""
    target, candidates = 4, range(4, 65, 4)
    for depth in candidates:
        if abs(depth - slices) < abs(target - slices):
            target = depth
    return target


def test_depth_is_the_nearest_multiple_of_four_with_ties_going_down():
    # 5 slices: 4 is nearer; 6 slices: 4 and 8 tie and the release keeps the smaller one.
    assert radfm.target_depth(5) == 4
    assert radfm.target_depth(6) == 4
    assert radfm.target_depth(7) == 8
    assert radfm.target_depth(10) == 8
    assert [radfm.target_depth(n) for n in range(1, 90)] == [
        release_target_depth(n) for n in range(1, 90)
    ]


def test_resize_is_torch_interpolate_default_nearest():
    """The release resizes with F.interpolate(s, size=...) and no mode: nearest."""
    hu = volume((20, 24, 10), seed=3)[0]
    x = radfm.preprocess(hu, image_size=16, max_frames=64)
    low, high = hu.min(), hu.max()
    display = ((hu - low) / (high - low)).permute(0, 2, 1, 3).flip(1, 2)  # (rows, cols, slices)
    expected = torch.nn.functional.interpolate(display[None], size=(16, 16, 8))[0]
    assert x.shape == (3, 16, 16, 8)
    torch.testing.assert_close(x[0], expected[0], rtol=0, atol=1e-6)
    # Nearest keeps the input's values: nothing in between is invented.
    assert torch.isin(x[0].flatten(), display.flatten()).all()
