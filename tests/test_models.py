"""Tests of the 3D ViT backbone (voxelfm.models) and its weight I/O.

Models are the ``tiny`` preset (or smaller custom sizes) so the whole file runs in seconds
on a CPU. Weights are randomised with non-trivial LayerScale gains: with the real init
(gamma = 1e-5) the blocks barely touch the output and convention bugs would hide inside
float tolerance.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from voxelfm.errors import InputError
from voxelfm.models import (
    VIT_PRESETS,
    VisionTransformer3D,
    build_vit,
    layer_id_for_param,
    load_backbone,
    load_published_checkpoint,
    save_backbone,
)
from voxelfm.models.layers import RopePositionEmbedding3D, apply_rope, patch_grid_coordinates


@pytest.fixture(scope="module", autouse=True)
def single_cpu_thread():
    """These models are tiny: one thread is faster than OpenMP fighting for shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randomized(model: VisionTransformer3D, seed: int = 0) -> VisionTransformer3D:
    """Fill every parameter with noise (LayerScale gains around 1) and switch to eval."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if name.endswith("gamma") else 0.1 * noise)
    return model.eval()


def tiny_model(seed: int = 0, **overrides) -> VisionTransformer3D:
    torch.manual_seed(seed)
    return randomized(build_vit("tiny", **overrides), seed)


def crop(*size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, *size, generator=generator)


# --- shapes, presets, parameter names -------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "crop_size", "grid"),
    [
        ("tiny", (32, 32, 32), (4, 4, 4)),
        ("tiny", (64, 64, 64), (8, 8, 8)),
        ("tiny", (16, 24, 32), (2, 3, 4)),
        ("tiny", (40, 8, 16), (5, 1, 2)),
        ("small", (28, 42, 56), (2, 3, 4)),
    ],
)
def test_forward_shapes(preset, crop_size, grid):
    torch.manual_seed(0)
    model = build_vit(preset).eval()
    dim = VIT_PRESETS[preset]["embed_dim"]
    num_patches = math.prod(grid)
    with torch.no_grad():
        out = model(crop(*crop_size))
    assert out.grid_size == grid
    assert out.x_norm_clstoken.shape == (2, dim)
    assert out.x_norm_regtokens.shape == (2, 4, dim)
    assert out.x_norm_patchtokens.shape == (2, num_patches, dim)
    assert out.x_prenorm.shape == (2, 1 + 4 + num_patches, dim)
    assert out.patch_grid().shape == (2, *grid, dim)
    assert out.masks is None


def test_outputs_are_slices_of_the_normalised_prenorm_tokens():
    model = tiny_model()
    with torch.no_grad():
        out = model(crop(16, 24, 32))
        normed = model.norm(out.x_prenorm)
    assert torch.equal(out.x_norm_clstoken, normed[:, 0])
    assert torch.equal(out.x_norm_regtokens, normed[:, 1:5])
    assert torch.equal(out.x_norm_patchtokens, normed[:, 5:])


def test_output_is_a_pytree_so_ddp_and_compile_see_its_tensors():
    model = tiny_model()
    masks = torch.zeros(2, 8, dtype=torch.bool)
    out = model(crop(16, 16, 16), masks=masks)
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    assert sum(isinstance(leaf, torch.Tensor) for leaf in leaves) == 5
    assert torch.utils._pytree.tree_unflatten(leaves, spec).grid_size == (2, 2, 2)


def test_patch_tokens_follow_c_order_over_the_grid():
    """Token (i*gy + j)*gz + k must embed voxels [i*p:(i+1)*p, j*p:..., k*p:...]."""
    model = tiny_model()
    x = crop(16, 24, 32)
    tokens, grid = model.patch_embed(x)
    p = model.patch_size
    _gx, gy, gz = grid
    for n in (0, 1, gz, gy * gz, 13, tokens.shape[1] - 1):
        i, j, k = n // (gy * gz), (n // gz) % gy, n % gz
        patch = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p, k * p : (k + 1) * p]
        expected = model.patch_embed.proj(patch).flatten(1)
        torch.testing.assert_close(tokens[:, n], expected)


def test_published_base_architecture_and_parameter_count():
    """ViT-B as in the reference ssl_default_config.yaml; count from the layer formulas."""
    with torch.device("meta"):
        model = build_vit("base")
    arch = model.architecture
    assert (arch["embed_dim"], arch["depth"], arch["num_heads"], arch["patch_size"]) == (
        864,
        12,
        12,
        14,
    )
    assert arch["num_register_tokens"] == 4
    assert arch["rope_base"] == 100.0 and arch["layerscale_init"] == 1e-5
    assert arch["mlp_ratio"] == 4 and arch["qkv_bias"] and arch["ffn_bias"]

    dim, hidden, patch = 864, 4 * 864, 14
    per_block = (
        2 * dim  # norm1
        + 3 * dim * dim
        + 3 * dim  # qkv
        + dim * dim
        + dim  # proj
        + dim  # ls1
        + 2 * dim  # norm2
        + dim * hidden
        + hidden  # fc1
        + hidden * dim
        + dim  # fc2
        + dim  # ls2
    )
    embeddings = dim * patch**3 + dim + (1 + 4 + 1) * dim  # conv, cls, registers, mask
    expected = embeddings + 12 * per_block + 2 * dim
    count = sum(p.numel() for p in model.parameters())
    print(f"VoxelFM ViT-B parameters: {count:,}")
    assert count == expected == 110_029_536


def test_state_dict_keys_are_the_reference_names():
    """Strict loading of published weights relies on exactly these names and shapes."""
    with torch.device("meta"):
        model = build_vit("base")
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected_globals = {
        "cls_token": (1, 1, 864),
        "register_tokens": (1, 4, 864),
        "mask_token": (1, 864),
        "patch_embed.proj.weight": (864, 1, 14, 14, 14),
        "patch_embed.proj.bias": (864,),
        "rope_embed.periods": (12,),
        "norm.weight": (864,),
        "norm.bias": (864,),
    }
    expected_block = {
        "norm1.weight": (864,),
        "norm1.bias": (864,),
        "attn.qkv.weight": (2592, 864),
        "attn.qkv.bias": (2592,),
        "attn.proj.weight": (864, 864),
        "attn.proj.bias": (864,),
        "ls1.gamma": (864,),
        "norm2.weight": (864,),
        "norm2.bias": (864,),
        "mlp.fc1.weight": (3456, 864),
        "mlp.fc1.bias": (3456,),
        "mlp.fc2.weight": (864, 3456),
        "mlp.fc2.bias": (864,),
        "ls2.gamma": (864,),
    }
    expected = dict(expected_globals)
    for i in range(12):
        expected.update({f"blocks.{i}.{name}": shape for name, shape in expected_block.items()})
    assert shapes == expected


@pytest.mark.parametrize(
    ("name", "layer_id"),
    [
        ("cls_token", 0),
        ("register_tokens", 0),
        ("mask_token", 0),
        ("patch_embed.proj.weight", 0),
        ("blocks.0.norm1.weight", 1),
        ("blocks.3.attn.qkv.bias", 4),
        ("blocks.11.ls2.gamma", 12),
        ("norm.weight", 13),
        ("backbone.blocks.5.mlp.fc1.weight", 6),
        ("backbone.module.patch_embed.proj.bias", 0),
        ("module.norm.bias", 13),
    ],
)
def test_layer_id_for_param(name, layer_id):
    assert layer_id_for_param(name, num_layers=12) == layer_id


def test_layer_ids_cover_every_tiny_parameter():
    model = build_vit("tiny")
    depth = model.architecture["depth"]
    ids = {name: layer_id_for_param(name, depth) for name, _ in model.named_parameters()}
    assert set(ids.values()) == set(range(depth + 2))
    assert ids["norm.weight"] == depth + 1


def test_build_vit_rejects_unknown_preset_and_options():
    with pytest.raises(ValueError, match="unknown ViT preset 'huge'"):
        build_vit("huge")
    with pytest.raises(ValueError, match="unknown ViT options \\['depht'\\]"):
        build_vit("tiny", depht=3)


# --- input validation ------------------------------------------------------------------


@pytest.mark.parametrize("crop_size", [(30, 32, 32), (32, 32, 33), (8, 12, 8)])
def test_crop_not_a_multiple_of_the_patch_size_is_rejected(crop_size):
    model = build_vit("tiny")
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        model(crop(*crop_size))


@pytest.mark.parametrize("shape", [(2, 2, 16, 16, 16), (2, 16, 16, 16), (16, 16, 16)])
def test_input_must_be_single_channel_5d(shape):
    model = build_vit("tiny")
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y, Z\)"):
        model(torch.zeros(shape))


@pytest.mark.parametrize(
    "masks",
    [torch.zeros(2, 7, dtype=torch.bool), torch.zeros(2, 8), torch.zeros(8, dtype=torch.bool)],
)
def test_bad_masks_are_rejected(masks):
    model = build_vit("tiny")
    with pytest.raises(ValueError, match="masks must be bool of shape \\(2, 8\\)"):
        model(crop(16, 16, 16), masks=masks)


def test_head_dim_must_split_into_three_rope_axes():
    with pytest.raises(ValueError, match="head_dim divisible by 6"):
        build_vit("tiny", embed_dim=384, num_heads=6)  # head_dim 64


# --- masking (iBOT) ---------------------------------------------------------------------


def test_masked_patches_only_see_the_mask_token():
    model = tiny_model()
    x = crop(16, 24, 32)
    masks = torch.zeros(2, 24, dtype=torch.bool)
    masks[0, [0, 5, 23]] = True
    masks[1, [7, 12]] = True
    # Overwrite exactly the voxels of the masked patches (C-order token -> grid position).
    altered = x.clone()
    p, (gy, gz) = model.patch_size, (3, 4)
    for b, n in masks.nonzero().tolist():
        i, j, k = n // (gy * gz), (n // gz) % gy, n % gz
        altered[b, :, i * p : (i + 1) * p, j * p : (j + 1) * p, k * p : (k + 1) * p] += 5.0

    with torch.no_grad():
        masked = model(x, masks=masks)
        masked_altered = model(altered, masks=masks)
        unmasked = model(x)
        unmasked_altered = model(altered)
        model.mask_token.add_(1.0)
        other_mask_token = model(x, masks=masks)

    assert masked.masks is masks
    assert torch.equal(masked.x_prenorm, masked_altered.x_prenorm)
    assert not torch.allclose(unmasked.x_prenorm, unmasked_altered.x_prenorm)
    assert not torch.allclose(masked.x_prenorm, unmasked.x_prenorm)
    assert not torch.allclose(masked.x_prenorm, other_mask_token.x_prenorm)


def test_all_false_mask_equals_no_mask():
    model = tiny_model()
    x = crop(16, 16, 16)
    with torch.no_grad():
        plain = model(x).x_prenorm
        masked = model(x, masks=torch.zeros(2, 8, dtype=torch.bool)).x_prenorm
    assert torch.equal(plain, masked)


# --- RoPE -------------------------------------------------------------------------------


def rope_scores(rope: RopePositionEmbedding3D, q, k, coords) -> torch.Tensor:
    sin, cos = rope.sin_cos_for_coordinates(coords)
    return apply_rope(q, sin, cos) @ apply_rope(k, sin, cos).transpose(-1, -2)


@pytest.mark.parametrize(
    "shift", [(0.4, 0.0, 0.0), (0.0, -0.7, 0.0), (0.0, 0.0, 1.3), (0.25, -1.5, 0.9)]
)
def test_rope_scores_depend_only_on_relative_position(shift):
    rope = RopePositionEmbedding3D(96, num_heads=2)  # head_dim 48
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, 10, 48, generator=generator)
    coords = torch.rand(10, 3, generator=generator) * 2 - 1
    scores = rope_scores(rope, q, k, coords)
    shifted = rope_scores(rope, q, k, coords + torch.tensor(shift))
    torch.testing.assert_close(shifted, scores, atol=1e-4, rtol=1e-4)
    # Moving a single token changes its offsets to all others, hence its scores.
    moved = coords.clone()
    moved[3] += torch.tensor(shift)
    changed = rope_scores(rope, q, k, moved)
    assert (changed[..., 3, :] - scores[..., 3, :]).abs().max() > 1e-2
    torch.testing.assert_close(changed[..., :3, :3], scores[..., :3, :3], atol=1e-4, rtol=1e-4)


def test_rope_is_a_rotation_and_identity_at_the_origin():
    rope = RopePositionEmbedding3D(96, num_heads=2)
    x = torch.randn(1, 2, 5, 48)
    sin, cos = rope.sin_cos_for_coordinates(torch.rand(5, 3))
    torch.testing.assert_close(apply_rope(x, sin, cos).norm(dim=-1), x.norm(dim=-1))
    sin0, cos0 = rope.sin_cos_for_coordinates(torch.zeros(5, 3))
    torch.testing.assert_close(apply_rope(x, sin0, cos0), x)


def test_rope_periods_and_grid_coordinates():
    rope = RopePositionEmbedding3D(864, num_heads=12, base=100.0)  # published: head_dim 72
    expected_periods = torch.tensor([100.0 ** (p / 12) for p in range(12)])
    torch.testing.assert_close(rope.periods, expected_periods)
    coords = patch_grid_coordinates((2, 3, 4))
    assert coords.shape == (24, 3)
    torch.testing.assert_close(coords[0], torch.tensor([-0.5, -2 / 3, -0.75]))
    torch.testing.assert_close(coords[-1], torch.tensor([0.5, 2 / 3, 0.75]))
    assert torch.equal(coords[1, :2], coords[0, :2])  # last axis varies fastest
    sin, cos = rope((2, 3, 4))
    assert sin.shape == cos.shape == (24, 72) and sin.dtype == torch.float32


def test_rope_rescale_only_in_training():
    rope = RopePositionEmbedding3D(96, num_heads=2, rescale_coords=2.0)
    rope.eval()
    torch.testing.assert_close(rope((2, 2, 2))[0], rope((2, 2, 2))[0])
    rope.train()
    torch.manual_seed(0)
    assert not torch.allclose(rope((2, 2, 2))[0], rope((2, 2, 2))[0])


# --- agreement with the reference implementation's equations ----------------------------


def reference_forward(state: dict, arch: dict, x: torch.Tensor, pairing: str = "interleaved"):
    """Independent re-statement of the rmaguado/VoxelFM forward pass (eval mode).

    Follows the reference equations: patch tokens in (d h w) order; q, k, v from one qkv
    linear laid out (3, heads, head_dim); RoPE on patch tokens only, head split into
    contiguous (axis0 | axis1 | axis2) blocks, pairs (2p, 2p+1) rotated by
    2*pi*coord/period_p with coord = 2*(index + 0.5)/n - 1 and
    period_p = base ** (2p / (head_dim/3)); explicit softmax(q k^T / sqrt(head_dim)) v.
    ``pairing="half"`` swaps in the GPT-NeoX convention (p, p + half) to prove the test
    notices convention mistakes.
    """
    dim, heads, depth = arch["embed_dim"], arch["num_heads"], arch["depth"]
    head_dim, num_prefix = dim // heads, 1 + arch["num_register_tokens"]
    patches = F.conv3d(
        x,
        state["patch_embed.proj.weight"],
        state["patch_embed.proj.bias"],
        stride=arch["patch_size"],
    )
    batch, _, d, h, w = patches.shape
    patches = patches.permute(0, 2, 3, 4, 1).reshape(batch, d * h * w, dim)
    tokens = torch.cat(
        [
            state["cls_token"].repeat(batch, 1, 1),
            state["register_tokens"].repeat(batch, 1, 1),
            patches,
        ],
        dim=1,
    )

    pairs = head_dim // 6
    periods = arch["rope_base"] ** (2.0 * torch.arange(pairs) / (head_dim // 3))
    axes = [torch.arange(0.5, n) / n for n in (d, h, w)]
    coords = 2.0 * torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3) - 1.0
    angles = torch.remainder(2.0 * math.pi * coords[:, :, None] / periods, 2.0 * math.pi)

    def rotate(t):  # (B, H, N_total, head_dim)
        special, patch = t[:, :, :num_prefix], t[:, :, num_prefix:]
        rotated_blocks = []
        for axis, block in enumerate(patch.split(head_dim // 3, dim=-1)):
            s, c = angles[:, axis].sin(), angles[:, axis].cos()
            if pairing == "interleaved":
                even, odd = block[..., 0::2], block[..., 1::2]
            else:
                even, odd = block[..., :pairs], block[..., pairs:]
            new_even, new_odd = even * c - odd * s, even * s + odd * c
            if pairing == "interleaved":
                out = torch.stack([new_even, new_odd], dim=-1).flatten(-2)
            else:
                out = torch.cat([new_even, new_odd], dim=-1)
            rotated_blocks.append(out)
        return torch.cat([special, torch.cat(rotated_blocks, dim=-1)], dim=2)

    def layer_norm(t, prefix):
        return F.layer_norm(t, (dim,), state[f"{prefix}.weight"], state[f"{prefix}.bias"], 1e-5)

    for i in range(depth):
        b = f"blocks.{i}"
        hidden = layer_norm(tokens, f"{b}.norm1")
        qkv = F.linear(hidden, state[f"{b}.attn.qkv.weight"], state[f"{b}.attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q), rotate(k)
        attn = ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        mixed = (attn @ v).transpose(1, 2).reshape(batch, -1, dim)
        mixed = F.linear(mixed, state[f"{b}.attn.proj.weight"], state[f"{b}.attn.proj.bias"])
        tokens = tokens + state[f"{b}.ls1.gamma"] * mixed
        hidden = layer_norm(tokens, f"{b}.norm2")
        hidden = F.gelu(F.linear(hidden, state[f"{b}.mlp.fc1.weight"], state[f"{b}.mlp.fc1.bias"]))
        hidden = F.linear(hidden, state[f"{b}.mlp.fc2.weight"], state[f"{b}.mlp.fc2.bias"])
        tokens = tokens + state[f"{b}.ls2.gamma"] * hidden
    return layer_norm(tokens, "norm")


REFERENCE_CASES = {
    "tiny": {"preset": "tiny", "crop_size": (16, 24, 32)},
    # head_dim 72 as in the published ViT-B (12 rotation pairs per axis), 2 blocks.
    "base_heads": {
        "preset": "base",
        "overrides": {"embed_dim": 144, "num_heads": 2, "depth": 2},
        "crop_size": (28, 42, 56),
    },
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_matches_reference_equations(case):
    spec = REFERENCE_CASES[case]
    torch.manual_seed(0)
    model = randomized(build_vit(spec["preset"], **spec.get("overrides", {})))
    x = crop(*spec["crop_size"])
    with torch.no_grad():
        ours = model.norm(model(x).x_prenorm)
        reference = reference_forward(model.state_dict(), model.architecture, x)
        wrong_pairing = reference_forward(model.state_dict(), model.architecture, x, "half")
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    assert (wrong_pairing - reference).abs().max() > 1e-3


# --- training-mode behaviour, determinism, precision -------------------------------------


def test_construction_and_forward_are_deterministic():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    torch.manual_seed(0)
    fresh_a = build_vit("tiny").state_dict()
    torch.manual_seed(0)
    fresh_b = build_vit("tiny").state_dict()
    assert all(torch.equal(fresh_a[n], fresh_b[n]) for n in fresh_a)
    x = crop(16, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x).x_prenorm, a(x).x_prenorm)


def test_drop_path_is_active_in_training_only():
    dropping = tiny_model(drop_path_rate=0.5)
    plain = tiny_model(drop_path_rate=0.0)
    plain.load_state_dict(dropping.state_dict())
    x = crop(16, 16, 16, batch=8)
    with torch.no_grad():
        eval_out = dropping(x).x_prenorm
        assert torch.equal(eval_out, dropping(x).x_prenorm)
        assert torch.equal(eval_out, plain(x).x_prenorm)
        dropping.train()
        torch.manual_seed(0)
        train_a = dropping(x).x_prenorm
        train_b = dropping(x).x_prenorm
    assert not torch.allclose(train_a, train_b)


def test_drop_path_schedule():
    uniform = build_vit("tiny", drop_path_rate=0.2)
    ramp = build_vit("tiny", drop_path_rate=0.2, drop_path_uniform=False)
    assert [b.drop_path1.drop_prob for b in uniform.blocks] == pytest.approx([0.2] * 4)
    assert [b.drop_path2.drop_prob for b in ramp.blocks] == pytest.approx(
        [0, 0.2 / 3, 0.4 / 3, 0.2]
    )


def test_gradients_reach_every_parameter_but_the_mask_token_without_masks():
    model = tiny_model().train()
    masks = torch.zeros(2, 8, dtype=torch.bool)
    masks[:, 0] = True
    out = model(crop(16, 16, 16), masks=masks)
    (out.x_norm_clstoken.sum() + out.x_norm_patchtokens.square().mean()).backward()
    # Register tokens feed the CLS token through attention, so everything gets a gradient.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bf16_autocast_forward_on_cpu():
    model = tiny_model()
    x = crop(16, 24, 32)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rope_sin, _ = model.rope_embed((2, 3, 4))
            out = model(x)
    assert rope_sin.dtype == torch.float32
    assert torch.isfinite(out.x_norm_patchtokens).all()
    similarity = F.cosine_similarity(
        out.x_norm_patchtokens.float().flatten(1), reference.x_norm_patchtokens.flatten(1)
    )
    assert similarity.min() > 0.98


# --- published checkpoints ---------------------------------------------------------------


def head_weights(prefix: str, seed: int) -> dict[str, torch.Tensor]:
    """DINO/iBOT head entries as the reference writes them (weight-normed last layer)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}.mlp.0.weight": torch.randn(16, 192, generator=generator),
        f"{prefix}.mlp.0.bias": torch.randn(16, generator=generator),
        f"{prefix}.last_layer.parametrizations.weight.original0": torch.ones(32, 1),
        f"{prefix}.last_layer.parametrizations.weight.original1": torch.randn(32, 8),
    }


def reference_submodel(model: VisionTransformer3D, seed: int, ddp: bool = False) -> dict:
    backbone = "backbone.module." if ddp else "backbone."
    entries = {backbone + name: t.clone() for name, t in model.state_dict().items()}
    return entries | head_weights("dino_head", seed) | head_weights("ibot_head", seed + 1)


@pytest.fixture
def published(tmp_path):
    """A tiny model and the {"teacher": ...} file the reference releases for it."""
    model = tiny_model(seed=1)
    path = tmp_path / "99999.pth"
    torch.save({"teacher": reference_submodel(model, seed=1)}, path)
    return model, path


def test_load_published_teacher_checkpoint_reproduces_outputs(published):
    source, path = published
    loaded = load_published_checkpoint(path, preset="tiny")
    assert not loaded.training
    x = crop(16, 24, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x).x_prenorm, source(x).x_prenorm)


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_load_reference_training_checkpoint(tmp_path, which):
    teacher, student = tiny_model(seed=1), tiny_model(seed=2)
    state = {f"teacher.{k}": v for k, v in reference_submodel(teacher, seed=1).items()}
    state |= {f"student.{k}": v for k, v in reference_submodel(student, 2, ddp=True).items()}
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}
    path = tmp_path / "checkpoint.pth"
    torch.save({"iteration": 100, "model": state, "optimizer": optimizer}, path)

    loaded = load_published_checkpoint(path, preset="tiny", which=which)
    source = {"teacher": teacher, "student": student}[which]
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_missing_checkpoint_is_a_one_line_error_naming_the_file(tmp_path):
    path = tmp_path / "nowhere" / "99999.pth"
    with pytest.raises(InputError) as error:
        load_published_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "not found" in message and "\n" not in message


def mutate_drop(entries):
    del entries["backbone.blocks.2.attn.qkv.bias"]


def mutate_extra(entries):
    entries["backbone.blocks.0.attn.q_norm.weight"] = torch.ones(48)


def mutate_shape(entries):
    entries["backbone.mask_token"] = torch.zeros(1, 1, 192)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (mutate_drop, "missing keys (1): blocks.2.attn.qkv.bias"),
        (mutate_extra, "unexpected keys (1): blocks.0.attn.q_norm.weight"),
        (mutate_shape, "shape mismatches (checkpoint vs model) (1): mask_token (1, 1, 192)"),
    ],
)
def test_key_mismatches_are_listed(tmp_path, mutate, expected):
    entries = reference_submodel(tiny_model(), seed=0)
    mutate(entries)
    path = tmp_path / "bad.pth"
    torch.save({"teacher": entries}, path)
    with pytest.raises(InputError, match="do not match the 'tiny' ViT preset") as error:
        load_published_checkpoint(path, preset="tiny")
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_wrong_architecture_reports_missing_keys_and_shape_mismatches(published):
    _, path = published
    with pytest.raises(InputError) as error:
        load_published_checkpoint(path, preset="tiny", embed_dim=96, depth=5)
    assert "missing keys (14): blocks.4." in str(error.value)
    assert "blocks.0.attn.qkv.weight (576, 192) vs (288, 96)" in str(error.value)


def test_wrong_rope_base_is_detected(published):
    _, path = published
    with pytest.raises(InputError, match="rope_base=10.0"):
        load_published_checkpoint(path, preset="tiny", rope_base=10.0)


def test_teacher_only_file_has_no_student(published):
    _, path = published
    with pytest.raises(InputError, match="only teacher weights"):
        load_published_checkpoint(path, preset="tiny", which="student")


class NotATensor:
    """Anything pickled that is not on torch's weights_only allow-list."""


def test_checkpoints_are_loaded_without_unpickling_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"backbone.cls_token": NotATensor()}}, path)
    with pytest.raises(InputError, match="not a safe weights file"):
        load_published_checkpoint(path, preset="tiny")


# --- our own checkpoints ------------------------------------------------------------------


@pytest.mark.parametrize("target", ["run_dir", "weights.safetensors"])
def test_save_and_load_backbone_round_trip(tmp_path, target):
    model = tiny_model(seed=4, drop_path_rate=0.1)
    config = {"model": {"preset": "tiny"}, "seed": 4}
    weights = save_backbone(model, tmp_path / target, config)
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    assert sidecar["architecture"] == model.architecture and sidecar["config"] == config
    assert sorted(p.name for p in weights.parent.iterdir()) == sorted(
        [weights.name, weights.with_suffix(".json").name]
    )  # no temporary files left behind

    loaded = load_backbone(tmp_path / target)
    x = crop(16, 24, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x).x_prenorm, model(x).x_prenorm)
    assert load_backbone(weights, drop_path_rate=0.0).architecture["drop_path_rate"] == 0.0


def test_load_backbone_detects_a_stale_pair(tmp_path):
    weights = save_backbone(tiny_model(seed=1), tmp_path / "a.safetensors")
    other = save_backbone(tiny_model(seed=2), tmp_path / "b.safetensors")
    weights.write_bytes(other.read_bytes())
    with pytest.raises(InputError, match="SHA-256 differs"):
        load_backbone(weights)


def test_load_backbone_missing_sidecar(tmp_path):
    weights = save_backbone(tiny_model(), tmp_path / "w.safetensors")
    weights.with_suffix(".json").unlink()
    with pytest.raises(InputError, match="w.json: backbone checkpoint file not found"):
        load_backbone(weights)


def test_unserialisable_config_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_backbone(tiny_model(), tmp_path / "out", {"path": object()})
    assert not (tmp_path / "out").exists()
