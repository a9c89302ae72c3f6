"""CT-CLIP adapter: architecture, release key layout, preprocessing, extraction (random
weights, small configurations; the full architecture only on the meta device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.extract.backbones import build_extractor
from voxelfm.extract.extractor import extract_features
from voxelfm.extract.foreign.common import RANDOM_WEIGHTS_LABEL
from voxelfm.extract.foreign.ct_clip import CTCLIPImageEncoder, CTViTConfig

SMALL = {
    "dim": 32,
    "latent_dim": 32,
    "image_size": 40,
    "frames": 20,
    "spatial_depth": 1,
    "temporal_depth": 2,
    "dim_head": 8,
    "heads": 2,
    "codebook_size": 16,
}


def small_spec(**extra):
    return {"kind": "ct_clip", "overrides": SMALL, **extra}


def noisy_volume(shape=(30, 40, 16), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(-300, 500, shape).astype(np.float32)


def release_state_dict(model: CTCLIPImageEncoder, prefix: str = "") -> dict:
    """CT-CLIP_v2.pt's layout: the CTCLIP keys, plus text tower and unused CTViT parts."""
    state = {prefix + key: value.clone() for key, value in model.state_dict().items()}
    extra = {
        "text_transformer.embeddings.word_embeddings.weight": torch.randn(30, 8),
        "text_transformer.encoder.layer.0.attention.self.query.weight": torch.randn(8, 8),
        "to_text_latent.weight": torch.randn(32, 8),
        "to_text_latent_extra.weight": torch.randn(32, 8),
        "to_visual_latent_extra.weight": torch.randn(32, 128),
        "temperature": torch.tensor(1.0),
        "visual_transformer.to_patch_emb_first_frame.1.weight": torch.randn(400),
        "visual_transformer.to_pixels_first_frame.0.weight": torch.randn(400, 32),
        "visual_transformer.to_pixels.0.weight": torch.randn(4000, 32),
        "visual_transformer.vq._codebook.initted": torch.tensor([1.0]),
        "visual_transformer.vq._codebook.cluster_size": torch.ones(1, 16),
        "visual_transformer.vq._codebook.embed_avg": torch.randn(1, 16, 32),
    }
    return {**state, **{prefix + key: value for key, value in extra.items()}}


def test_full_architecture_matches_the_release_config():
    config = CTViTConfig()
    assert config.input_size == (240, 480, 480) and config.grid == (24, 24, 24)
    assert config.image_dim == 294912  # mean over t, then 24 * 24 * 512
    with torch.device("meta"):
        model = CTCLIPImageEncoder(config)
        latent, tokens, quantised = model(torch.empty(1, 1, 240, 480, 480))
    assert tuple(latent.shape) == (1, 512)
    assert tuple(tokens.shape) == tuple(quantised.shape) == (1, 24, 24, 24, 512)
    d, inner, ff = 512, 8 * 32, int(4 * 2 / 3 * 512)
    per_layer = (
        (27 * d + d)  # PEG depthwise conv
        + 2 * 32  # q_scale, k_scale
        + 2 * d  # norm and context_norm gains
        + d * inner
        + d * 2 * inner
        + inner * d  # to_q, to_kv, to_out
        + 2 * d
        + d * 2 * ff
        + ff * d  # feed-forward: LayerNorm, GEGLU in, out
    )
    expected = (
        (2 * d + d)
        + (d * d + d)
        + (d * 8 + 8)  # continuous position bias MLP
        + 2 * 4000
        + (4000 * d + d)
        + 2 * d  # patch embedding
        + 8 * per_layer
        + 2 * d  # norm_out gains of both transformers
        + 294912 * 512  # to_visual_latent
    )
    assert sum(p.numel() for p in model.parameters()) == expected
    assert tuple(model.state_dict()["visual_transformer.vq._codebook.embed"].shape) == (
        1,
        8192,
        512,
    )


def test_latent_and_quantisation_match_independent_computation():
    extractor = build_extractor(small_spec(random_weights=True), "cpu")
    model = extractor.model
    x = torch.randn(2, 1, 20, 40, 40) * 0.5
    with torch.no_grad():
        latent, tokens, quantised = model(x)
    codebook = model.visual_transformer.vq._codebook.embed[0]
    nearest = (F.normalize(tokens, dim=-1) @ F.normalize(codebook, dim=-1).T).argmax(-1)
    torch.testing.assert_close(quantised, codebook[nearest])
    pooled = quantised.mean(dim=1).flatten(1)  # (B, h * w * dim)
    expected = F.normalize(pooled @ model.to_visual_latent.weight.T, dim=-1)
    torch.testing.assert_close(latent, expected)


def test_preprocessing_values_orientation_and_padding():
    extractor = build_extractor(small_spec(random_weights=True), "cpu")
    assert extractor.spacing_mm == (0.75, 0.75, 1.5)
    hu = np.full((20, 40, 10), 500.0, dtype=np.float32)
    hu[-1, -1, -1] = 3000.0  # right, anterior, superior corner
    hu[0, 0, 0] = -2000.0  # left, posterior, inferior corner
    x, _ = extractor.prepare(torch.from_numpy(hu)[None, None])
    assert tuple(x.shape) == (1, 1, 20, 40, 40)  # (D, H, W) = frames, image, image
    x = x[0, 0]
    # Centre padding: D 10 -> 20 (5 before), H (our X) 20 -> 40 (10 before), W (our Y) full.
    assert float(x[0, 0, 0]) == -1.0 and float(x[19, 39, 39]) == -1.0  # pad = -1000 HU
    assert float(x[5 + 9, 10 + 0, 0]) == pytest.approx(1.0)  # superior, right, anterior
    assert float(x[5 + 0, 10 + 19, 39]) == pytest.approx(-1.0)  # inferior, left, posterior
    assert float(x[10, 20, 20]) == pytest.approx(0.5)  # 500 HU / 1000


def test_spacing_other_than_the_models_is_resampled():
    extractor = build_extractor(small_spec(random_weights=True, spacing_mm=0.75), "cpu")
    hu = np.full((40, 40, 40), 200.0, dtype=np.float32)
    x, maps = extractor.prepare(torch.from_numpy(hu)[None, None])
    assert tuple(x.shape) == (1, 1, 20, 40, 40)
    assert float(x[0, 0, 10, 20, 20]) == pytest.approx(0.2)
    # Our Z voxel k (0.75 mm) sits at model slice (k + 0.5) / 2 - 0.5 (1.5 mm slices).
    assert maps[0][0].source == 2 and maps[0][0](3.0) == pytest.approx(1.25)


def test_release_layout_loads_and_gives_identical_outputs(tmp_path):
    reference = build_extractor(small_spec(random_weights=True, seed=3), "cpu")
    assert reference.describe()["weights"] == RANDOM_WEIGHTS_LABEL
    hu = torch.from_numpy(noisy_volume(shape=(40, 40, 20)))[None, None]
    cls_ref, patch_ref = reference(hu)
    torch.save(release_state_dict(reference.model), tmp_path / "CT-CLIP_v2.pt")
    torch.save(release_state_dict(reference.model, "module."), tmp_path / "ddp.pt")
    for name in ("CT-CLIP_v2.pt", "ddp.pt"):
        loaded = build_extractor(small_spec(path=str(tmp_path / name), seed=99), "cpu")
        cls, patch = loaded(hu)
        assert torch.equal(cls, cls_ref) and torch.equal(patch, patch_ref), name
        assert len(loaded.describe()["weights"]) == 64


def test_missing_and_wrong_weights_give_one_line_errors(tmp_path):
    with pytest.raises(InputError) as missing:
        build_extractor(small_spec(path=str(tmp_path / "CT-CLIP_v2.pt")), "cpu")
    message = str(missing.value)
    assert "\n" not in message and "CT-CLIP weights not found" in message
    assert "CT-RATE" in message
    model = build_extractor(small_spec(random_weights=True), "cpu").model
    state = release_state_dict(model)
    del state["to_visual_latent.weight"]
    state["visual_transformer.unknown.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(InputError) as wrong:
        build_extractor(small_spec(path=str(tmp_path / "wrong.pt")), "cpu")
    message = str(wrong.value)
    assert "\n" not in message and "CT-CLIP" in message and "wrong.pt" in message
    assert "to_visual_latent.weight" in message and "visual_transformer.unknown" in message
    with pytest.raises(VoxelFMError, match="missing path"):
        build_extractor({"kind": "ct_clip"}, "cpu")
    with pytest.raises(VoxelFMError, match="overrides"):
        build_extractor(small_spec(random_weights=True, overrides={"depth": 2}), "cpu")


def test_extract_features_gives_documented_sizes():
    extractor = build_extractor(small_spec(random_weights=True), "cpu")
    features = extract_features(noisy_volume(), extractor, spacing=(0.75, 0.75, 1.5))
    assert features.cls.shape == (32,)
    assert np.linalg.norm(features.cls) == pytest.approx(1.0, abs=1e-5)
    assert features.patch.shape == (2, 2, 1, 32)  # ceil((30, 40, 16) / 20)
    assert CTViTConfig().latent_dim == 512  # the release's latent width


def test_patch_tokens_land_on_our_axes():
    """A stub encoder whose tokens hold their own (t, h, w) index shows the axis mapping."""
    extractor = build_extractor(
        small_spec(random_weights=True, spacing_mm=0.75, patch_size=20), "cpu"
    )
    config = CTViTConfig(**{**SMALL, "image_size": 80, "frames": 40})
    extractor.architecture = config

    class Stub(torch.nn.Module):
        def forward(self, x):
            grid = config.grid
            index = torch.stack(
                torch.meshgrid(
                    *(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij"
                ),
                dim=-1,
            )
            tokens = torch.zeros(x.shape[0], *grid, config.dim)
            tokens[..., :3] = index
            return tokens[:, 0, 0, 0], tokens, tokens

    extractor.model = Stub()
    hu = torch.zeros(1, 1, 80, 80, 80)  # 60 mm at 0.75 mm: 4 x 4 x 4 model tokens exactly
    _, patch = extractor(hu)
    patch = patch[0]
    assert tuple(patch.shape[:3]) == (4, 4, 4)
    t_index, h_index, w_index = patch[..., 0], patch[..., 1], patch[..., 2]
    expected = torch.arange(4, dtype=torch.float32)
    torch.testing.assert_close(t_index[0, 0], expected)  # t grows with Z (superior)
    torch.testing.assert_close(h_index[:, 0, 0], expected.flip(0))  # h grows toward left (-X)
    torch.testing.assert_close(w_index[0, :, 0], expected.flip(0))  # w: toward posterior (-Y)


def test_quantiser_compares_against_normalised_rows_and_returns_raw_rows():
    """vector-quantize-pytorch's CosineSimCodebook normalises the codebook before the argmax;
    trained EMA rows are not unit-norm, so a long row must not win on length alone."""
    from voxelfm.extract.foreign.ct_clip import _CosineCodebook

    codebook = _CosineCodebook(codebook_size=2, dim=2)
    # Row 0 points along the token but is short; row 1 is 45 degrees off but ten times longer.
    codebook.embed.copy_(torch.tensor([[[0.5, 0.0], [7.0, 7.0]]]))
    tokens = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    quantised = codebook(tokens)
    torch.testing.assert_close(quantised, torch.tensor([[0.5, 0.0], [7.0, 7.0]]))

    # Random non-unit rows: the same codes as the cosine argmax, the raw rows returned.
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(1, 64, 8, generator=generator) * torch.rand(1, 64, 1, generator=generator)
    codebook = _CosineCodebook(codebook_size=64, dim=8)
    codebook.embed.copy_(rows)
    tokens = torch.randn(500, 8, generator=generator)
    nearest = (F.normalize(tokens, dim=-1) @ F.normalize(rows[0], dim=-1).T).argmax(-1)
    torch.testing.assert_close(codebook(tokens, chunk=64), rows[0][nearest])
