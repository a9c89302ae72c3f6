"""The eager attention path (explicit softmax(q k^T) v) computes what SDPA computes.

It exists as a benchmark baseline and for FLOP counting, so it must be a drop-in: same
state-dict keys, same outputs and gradients (float32, with RoPE and prefix tokens).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from voxelfm.models import build_vit
from voxelfm.models.layers import Attention, RopePositionEmbedding3D, eager_attention


@pytest.fixture(scope="module", autouse=True)
def single_cpu_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_eager_attention_matches_sdpa_kernel():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 24, generator=generator) for _ in range(3))
    torch.testing.assert_close(
        eager_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5
    )


def test_attention_module_paths_agree_with_rope_and_prefix_tokens():
    torch.manual_seed(0)
    dim, heads, grid, prefix = 72, 2, (3, 4, 2), 3
    attention = Attention(dim, heads)
    rope = RopePositionEmbedding3D(dim, num_heads=heads)(grid)
    x = torch.randn(2, prefix + 3 * 4 * 2, dim)
    sdpa = attention(x, rope, prefix)
    attention.attention_impl = "eager"
    torch.testing.assert_close(attention(x, rope, prefix), sdpa, atol=1e-5, rtol=1e-5)


def test_backbone_outputs_and_gradients_agree():
    torch.manual_seed(0)
    sdpa_model = build_vit("tiny", attention_impl="sdpa")
    eager_model = build_vit("tiny", attention_impl="eager")
    assert list(eager_model.state_dict()) == list(sdpa_model.state_dict())
    eager_model.load_state_dict(sdpa_model.state_dict())
    with torch.no_grad():  # LayerScale gains near 1 so the blocks matter (init is 1e-5)
        for model in (sdpa_model, eager_model):
            for name, param in model.named_parameters():
                if name.endswith("gamma"):
                    param.fill_(1.0)
    x = torch.randn(2, 1, 32, 24, 16, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 4 * 3 * 2, dtype=torch.bool)
    masks[0, :5] = True
    outputs = []
    for model in (sdpa_model, eager_model):
        out = model(x, masks=masks)
        out.x_prenorm.square().mean().backward()
        outputs.append((out.x_prenorm.detach(), model.blocks[0].attn.qkv.weight.grad))
    (sdpa_tokens, sdpa_grad), (eager_tokens, eager_grad) = outputs
    assert sdpa_tokens.abs().max() > 0.1
    torch.testing.assert_close(eager_tokens, sdpa_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager_grad, sdpa_grad, atol=1e-5, rtol=1e-4)


def test_switching_in_place_and_architecture_unchanged():
    model = build_vit("tiny")
    assert "attention_impl" not in model.architecture
    assert all(block.attn.attention_impl == "sdpa" for block in model.blocks)
    model.set_attention_impl("eager")
    assert all(block.attn.attention_impl == "eager" for block in model.blocks)
    assert "attention_impl='eager'" in repr(model.blocks[0].attn)


def test_unknown_attention_impl_is_rejected():
    with pytest.raises(ValueError, match="attention_impl"):
        build_vit("tiny", attention_impl="flash")
    with pytest.raises(ValueError, match="attention_impl"):
        build_vit("tiny").set_attention_impl("math")
