"""Multi-head self-attention with 3D RoPE on the patch tokens."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import apply_rope

AttentionImpl = Literal["sdpa", "eager"]
ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)


class Attention(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient
    kernels where available).

    The first ``num_prefix_tokens`` tokens (CLS and registers) have no position, so RoPE
    leaves their q and k unrotated; only the patch tokens after them are rotated.

    ``attention_impl="eager"`` computes the same function as ``softmax(q k^T / sqrt(d)) v``
    with explicit matmuls, materialising the (B, H, T, T) attention matrix: the reference
    point for benchmarks and FLOP counting, not meant for training. The choice has no
    parameters and can be changed on a built module (``module.attention_impl = ...``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_impl: AttentionImpl = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attention_impl = attention_impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    @property
    def attention_impl(self) -> str:
        return self._attention_impl

    @attention_impl.setter
    def attention_impl(self, value: str) -> None:
        if value not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {value!r}")
        self._attention_impl = value

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], num_prefix_tokens: int) -> Tensor:
        """
        Args:
            x: (B, P + N, D) tokens, P = num_prefix_tokens unrotated ones first.
            rope: (sin, cos), each (N, head_dim), from RopePositionEmbedding3D.
            num_prefix_tokens: P.

        Returns:
            (B, P + N, D).
        """
        batch, num_tokens, dim = x.shape
        # qkv output channels are ordered (q|k|v, head, head_dim), the reference layout.
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, P + N, head_dim)
        sin, cos = rope
        q = _rotate_patch_tokens(q, sin, cos, num_prefix_tokens)
        k = _rotate_patch_tokens(k, sin, cos, num_prefix_tokens)
        if self._attention_impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, P + N, head_dim)
        else:
            out = eager_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, num_tokens, dim))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attention_impl={self._attention_impl!r}"


def eager_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v with explicit matmuls; (B, H, T, head_dim) each.

    The softmax runs in float32 (autocast's rule for softmax), as in SDPA's math path.
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, T)
    weights = scores.float().softmax(dim=-1).to(v.dtype)
    return weights @ v


def _rotate_patch_tokens(t: Tensor, sin: Tensor, cos: Tensor, num_prefix_tokens: int) -> Tensor:
    """(B, H, P + N, head_dim): RoPE on the last N tokens, the first P passed through."""
    prefix, patches = t[:, :, :num_prefix_tokens], t[:, :, num_prefix_tokens:]
    return torch.cat((prefix, apply_rope(patches, sin, cos)), dim=2)
