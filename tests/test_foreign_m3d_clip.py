"""M3D-CLIP adapter: architecture, release key layout, preprocessing, extraction (random
weights, small configurations; the full architecture only on the meta device)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.extract.backbones import build_extractor
from voxelfm.extract.extractor import extract_features
from voxelfm.extract.foreign.common import RANDOM_WEIGHTS_LABEL
from voxelfm.extract.foreign.m3d_clip import (
    M3DCLIPImageEncoder,
    M3DViTConfig,
    foreground_box,
    normalise_intensity,
    percentile,
)

SMALL = {
    "img_size": [8, 32, 32],
    "patch_size": [4, 16, 16],
    "hidden_size": 32,
    "mlp_dim": 64,
    "num_layers": 2,
    "num_heads": 4,
}


def small_spec(**extra):
    return {"kind": "m3d_clip", "overrides": SMALL, "patch_size": 8, **extra}


def body_volume(shape=(24, 20, 16), seed=0) -> np.ndarray:
    """Air around a noisy soft-tissue box: a foreground the crop can find."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[3:-3, 2:-2, 2:-2] = rng.normal(40, 60, (shape[0] - 6, shape[1] - 4, shape[2] - 4))
    return hu


def release_state_dict(model: M3DCLIPImageEncoder, prefix: str = "") -> dict:
    """The HF release's layout: the CLIP model's keys plus text-tower keys (to be ignored)."""
    state = {prefix + key: value.clone() for key, value in model.state_dict().items()}
    state[prefix + "language_encoder.embeddings.word_embeddings.weight"] = torch.randn(30, 8)
    state[prefix + "language_encoder.encoder.layer.0.output.dense.weight"] = torch.randn(8, 8)
    state[prefix + "mm_language_proj.weight"] = torch.randn(32, 32)
    state[prefix + "mm_language_proj.bias"] = torch.randn(32)
    state[prefix + "logit_scale"] = torch.tensor(2.659)
    return state


def test_full_architecture_matches_the_release_config():
    config = M3DViTConfig()
    assert config.grid == (8, 16, 16)  # 2048 patches of 4 x 16 x 16
    with torch.device("meta"):
        model = M3DCLIPImageEncoder(config)
        projected, tokens = model(torch.empty(2, 1, 32, 256, 256))
    assert tuple(projected.shape) == (2, 768) and tuple(tokens.shape) == (2, 2049, 768)
    c, m, n = 768, 3072, 2048
    per_block = (3 * c * c) + (c * c + c) + (c * m + m) + (m * c + c) + 4 * c  # qkv no bias
    expected = (
        (4 * 16 * 16 * c + c)  # perceptron patch embedding
        + n * c  # position embeddings
        + c  # cls token
        + 12 * per_block
        + 2 * c  # final norm
        + c * c
        + c  # mm_vision_proj
    )
    assert sum(p.numel() for p in model.parameters()) == expected
    keys = set(model.state_dict())
    for key in (
        "vision_encoder.patch_embedding.patch_embeddings.1.weight",
        "vision_encoder.patch_embedding.position_embeddings",
        "vision_encoder.blocks.11.attn.qkv.weight",
        "vision_encoder.blocks.0.mlp.linear1.weight",
        "vision_encoder.cls_token",
        "mm_vision_proj.weight",
    ):
        assert key in keys


def test_percentile_and_foreground_normalisation_match_numpy():
    rng = np.random.default_rng(1)
    values = rng.normal(0, 300, 5001)
    for q in (0.05, 37.5, 99.95):
        assert float(percentile(torch.tensor(values), q)) == pytest.approx(
            np.percentile(values, q), rel=1e-9, abs=1e-9
        )
    hu = body_volume(seed=2)
    foreground = hu[hu > hu.mean()]
    low, high = np.percentile(foreground, [0.05, 99.95])
    clipped = np.clip(hu, low, high)
    z = (clipped - foreground.mean()) / foreground.std()  # M3D-Seg's z-score, then min-max
    expected = (z - z.min()) / (z.max() - z.min())
    got = normalise_intensity(torch.from_numpy(hu), None).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_preprocessing_orientation_and_known_hu_values():
    extractor = build_extractor(small_spec(random_weights=True, hu_window=[-1000, 1000]), "cpu")
    hu = np.full((16, 16, 16), -500.0, dtype=np.float32)
    hu[-4:, -4:, -4:] = 1000.0  # right, anterior, superior corner
    hu[:4, :4, :4] = -1000.0  # left, posterior, inferior corner
    x, _ = extractor.prepare(torch.from_numpy(hu)[None, None])
    assert tuple(x.shape) == (1, 1, 8, 32, 32)
    x = x[0, 0]
    # D: inferior -> superior; H: anterior -> posterior; W: right -> left.
    assert float(x[-1, 0, 0]) == pytest.approx(1.0)  # superior, anterior, right
    assert float(x[0, -1, -1]) == pytest.approx(0.0)  # inferior, posterior, left
    assert float(x[4, 16, 16]) == pytest.approx(0.25)  # -500 HU in the [-1000, 1000] window
    flipped = build_extractor(
        small_spec(random_weights=True, hu_window=[-1000, 1000], slice_order="superior_first"),
        "cpu",
    )
    x2, _ = flipped.prepare(torch.from_numpy(hu)[None, None])
    assert float(x2[0, 0, 0, 0, 0]) == pytest.approx(1.0)


def test_foreground_crop_removes_air_and_padding():
    extractor = build_extractor(small_spec(random_weights=True), "cpu")
    hu = body_volume()
    # Air is clipped to the foreground's low percentile -> 0 -> outside MONAI's
    # CropForeground box (voxels > 0): the box is the body.
    box = foreground_box(normalise_intensity(torch.from_numpy(hu), None))
    assert [(s.start, s.stop) for s in box] == [(3, 21), (2, 18), (2, 14)]
    # Our extraction padding (valid False) is cut off before the model's own steps.
    padded = np.full((32, 24, 16), -1024.0, dtype=np.float32)
    padded[:24, :20, :16] = hu
    valid = np.zeros(padded.shape, dtype=bool)
    valid[:24, :20, :16] = True
    x_padded, _ = extractor.prepare(
        torch.from_numpy(padded)[None, None], torch.from_numpy(valid)[None, None]
    )
    x_plain, _ = extractor.prepare(torch.from_numpy(hu)[None, None])
    np.testing.assert_allclose(x_padded.numpy(), x_plain.numpy(), atol=1e-6)


def test_release_layouts_load_and_give_identical_outputs(tmp_path):
    reference = build_extractor(small_spec(random_weights=True, seed=3), "cpu")
    assert reference.describe()["weights"] == RANDOM_WEIGHTS_LABEL
    hu = torch.from_numpy(body_volume())[None, None]
    cls_ref, patch_ref = reference(hu)
    torch.save(release_state_dict(reference.model), tmp_path / "pytorch_model.bin")
    save_file(release_state_dict(reference.model), str(tmp_path / "model.safetensors"))
    torch.save(release_state_dict(reference.model, "module."), tmp_path / "ddp.pt")
    for name in ("pytorch_model.bin", "model.safetensors", "ddp.pt"):
        loaded = build_extractor(small_spec(path=str(tmp_path / name), seed=99), "cpu")
        cls, patch = loaded(hu)
        assert torch.equal(cls, cls_ref) and torch.equal(patch, patch_ref), name
        assert len(loaded.describe()["weights"]) == 64  # sha256 of the file
    # pretrained_ViT.bin: the bare ViT, usable for the pre-projection CLS.
    vit = {k: v for k, v in reference.model.vision_encoder.state_dict().items()}
    torch.save(vit, tmp_path / "pretrained_ViT.bin")
    bare = build_extractor(
        small_spec(path=str(tmp_path / "pretrained_ViT.bin"), embedding="cls", seed=5), "cpu"
    )
    reference_cls = build_extractor(small_spec(random_weights=True, seed=3, embedding="cls"), "cpu")
    assert torch.equal(bare(hu)[0], reference_cls(hu)[0])
    with pytest.raises(InputError, match="embedding: cls"):
        build_extractor(small_spec(path=str(tmp_path / "pretrained_ViT.bin")), "cpu")


def test_missing_and_wrong_weights_give_one_line_errors(tmp_path):
    with pytest.raises(InputError) as missing:
        build_extractor(small_spec(path=str(tmp_path / "nope.bin")), "cpu")
    message = str(missing.value)
    assert "\n" not in message and "M3D-CLIP weights not found" in message
    assert "GoodBaiBai88/M3D-CLIP" in message
    model = build_extractor(small_spec(random_weights=True), "cpu").model
    state = release_state_dict(model)
    del state["vision_encoder.blocks.1.attn.qkv.weight"]
    state["vision_encoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "wrong.bin")
    with pytest.raises(InputError) as wrong:
        build_extractor(small_spec(path=str(tmp_path / "wrong.bin")), "cpu")
    message = str(wrong.value)
    assert "\n" not in message and "M3D-CLIP" in message and "wrong.bin" in message
    assert "blocks.1.attn.qkv.weight" in message and "vision_encoder.extra.weight" in message
    other = {**SMALL, "hidden_size": 16, "mlp_dim": 32}
    small = build_extractor({"kind": "m3d_clip", "random_weights": True, "overrides": other})
    torch.save(release_state_dict(small.model), tmp_path / "other.bin")
    with pytest.raises(InputError, match="shape"):
        build_extractor(small_spec(path=str(tmp_path / "other.bin")), "cpu")
    with pytest.raises(VoxelFMError, match="missing path"):
        build_extractor({"kind": "m3d_clip"}, "cpu")
    with pytest.raises(VoxelFMError, match="embedding"):
        build_extractor(small_spec(random_weights=True, embedding="mean"), "cpu")


def test_extract_features_gives_documented_sizes():
    extractor = build_extractor(small_spec(random_weights=True), "cpu")
    features = extract_features(body_volume(), extractor, spacing=(1.5, 1.5, 1.5))
    assert features.cls.shape == (32,)
    assert np.linalg.norm(features.cls) == pytest.approx(1.0, abs=1e-5)  # CLIP embedding
    assert features.patch.shape == (3, 3, 2, 32)  # ceil((24, 20, 16) / 8)
    assert extractor.embed_dim == M3DViTConfig.from_overrides(SMALL).hidden_size
    assert M3DViTConfig().hidden_size == 768  # the release's embedding width


def test_patch_tokens_land_on_our_axes():
    """A stub encoder whose tokens hold their own (D, H, W) index shows the axis mapping."""
    extractor = build_extractor(small_spec(random_weights=True, hu_window=[-1000, 1000]), "cpu")
    config = extractor.model.vision_encoder.config
    grid = config.grid

    class Stub(torch.nn.Module):
        def forward(self, x):
            index = torch.stack(
                torch.meshgrid(
                    *(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij"
                ),
                dim=-1,
            ).reshape(-1, 3)
            tokens = torch.zeros(x.shape[0], 1 + index.shape[0], config.hidden_size)
            tokens[:, 1:, :3] = index
            return tokens[:, 0], tokens

    extractor.model = Stub()
    hu = np.full((32, 32, 32), 100.0, dtype=np.float32)
    hu[0, 0, 0] = -1000.0  # sets the min-max range without moving the foreground box
    _, patch = extractor(torch.from_numpy(hu)[None, None])
    patch = patch[0]  # (gx, gy, gz, C) on our X, Y, Z
    assert tuple(patch.shape[:3]) == (4, 4, 4)
    d_index, h_index, w_index = patch[..., 0], patch[..., 1], patch[..., 2]
    assert torch.all(d_index[:, :, 1:] >= d_index[:, :, :-1])  # D grows with Z (superior)
    assert torch.all(h_index[:, 1:] <= h_index[:, :-1])  # H grows toward posterior (-Y)
    assert torch.all(w_index[1:] <= w_index[:-1])  # W grows toward the left (-X)
    assert float(d_index[0, 0, -1]) > float(d_index[0, 0, 0])
    assert float(w_index[0, 0, 0]) == pytest.approx(grid[2] - 1) and math.isclose(
        float(w_index[-1, 0, 0]), 0.0, abs_tol=1e-6
    )


def test_crop_and_resize_match_the_releases_monai_transforms():
    """M3D-Cap (m3d_cap_data_prepare.py) and M3D-Seg both run MONAI CropForeground then
    Resize(spatial_size, mode="bilinear"); on a 3D image MONAI resolves "bilinear" to
    trilinear (align_corners False). Nothing here uses MONAI's default "area"."""
    monai_transforms = pytest.importorskip("monai.transforms")
    from voxelfm.extract.foreign.m3d_clip import normalise_intensity

    extractor = build_extractor(small_spec(random_weights=True, hu_window=[-1000, 1000]), "cpu")
    hu = torch.from_numpy(body_volume())[None, None]
    x, _ = extractor.prepare(hu)
    display = hu[0, 0].permute(2, 1, 0).flip(1, 2)  # (D, H, W) = (Z, A->P, R->L)
    image = normalise_intensity(display, (-1000, 1000))[None].numpy()
    release = monai_transforms.Compose(
        [
            monai_transforms.CropForeground(),
            monai_transforms.Resize(spatial_size=SMALL["img_size"], mode="bilinear"),
        ]
    )(image)
    torch.testing.assert_close(x[0], torch.as_tensor(np.asarray(release)), rtol=0, atol=1e-6)
