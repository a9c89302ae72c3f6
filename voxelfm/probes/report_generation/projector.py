"""Attentional pooling of frozen visual inputs to a fixed number of visual tokens.

A scan arrives as T frozen tokens of width D: the patch tokens average-pooled to the task's
token grid (T = gx * gy * gz), or its global vector as a single token (T = 1). Learned
queries cross-attend to them (as a Q-Former / Perceiver resampler does) and return
``n_visual_tokens`` tokens in the width of the language model that reads them, so the decoder
always sees the same number of visual tokens whatever the backbone and grid.
"""

from __future__ import annotations

import torch
from torch import nn


class VisualProjector(nn.Module):
    """(B, T, D) frozen tokens -> (B, K, W) visual tokens for the language model.

    Args:
        input_dim: D, the backbone's token width.
        n_inputs: T, tokens per scan (a learned position embedding tells grid cells apart).
        width: W, the language model's width.
        n_visual_tokens: K, learned queries.
        n_heads: attention heads (must divide ``width``).
    """

    def __init__(
        self,
        input_dim: int,
        n_inputs: int,
        width: int,
        n_visual_tokens: int = 8,
        n_heads: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        # Frozen tokens of different backbones differ wildly in scale; normalise first.
        self.input_norm = nn.LayerNorm(input_dim)
        self.project = nn.Linear(input_dim, width)
        self.input_position = nn.Parameter(0.02 * torch.randn(1, n_inputs, width))
        self.queries = nn.Parameter(0.02 * torch.randn(1, n_visual_tokens, width))
        self.attention = nn.MultiheadAttention(width, n_heads, dropout=dropout, batch_first=True)
        self.feed_forward = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.output_norm = nn.LayerNorm(width)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        keys = self.project(self.input_norm(inputs)) + self.input_position  # (B, T, W)
        queries = self.queries.expand(len(inputs), -1, -1)  # (B, K, W)
        pooled, _ = self.attention(queries, keys, keys, need_weights=False)  # (B, K, W)
        pooled = pooled + queries
        return self.output_norm(pooled + self.feed_forward(pooled))  # (B, K, W)
