"""The default report probe: a small transformer decoder trained from scratch.

The frozen visual inputs of a scan go through the attentional projector to
``n_visual_tokens`` tokens, which every decoder layer cross-attends to; the decoder is trained
with teacher forcing (next-token cross-entropy, padding ignored) by AdamW, and the epoch with
the lowest validation loss is kept. Generation is greedy or beam search (``decoding``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from voxelfm.errors import VoxelFMError
from voxelfm.probes.report_generation.decoding import decode
from voxelfm.probes.report_generation.projector import VisualProjector
from voxelfm.probes.report_generation.tokenizer import ReportTokenizer
from voxelfm.probes.report_generation.training import pad_sequences, train_on_val_loss
from voxelfm.utils.atomic import atomic_write_text


@dataclass(frozen=True)
class DecoderSettings:
    """Architecture, optimisation and decoding settings of the decoder probe."""

    width: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_visual_tokens: int = 8
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_epochs: int = 60
    patience: int = 10
    batch_size: int = 16
    max_length: int = 256
    beam_size: int = 1
    length_penalty: float = 1.0
    max_new_tokens: int | None = None
    device: str = "cpu"


class ReportDecoder(nn.Module):
    """(B, T, D) visual inputs and (B, L) token ids -> (B, L, V) next-token logits."""

    def __init__(
        self,
        input_dim: int,
        n_inputs: int,
        vocab_size: int,
        *,
        width: int,
        n_layers: int,
        n_heads: int,
        n_visual_tokens: int,
        dropout: float,
        max_length: int,
        pad_id: int,
    ):
        super().__init__()
        self.pad_id = pad_id
        self.projector = VisualProjector(
            input_dim, n_inputs, width, n_visual_tokens, n_heads, dropout
        )
        self.token_embedding = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.position_embedding = nn.Parameter(0.02 * torch.randn(1, max_length, width))
        layer = nn.TransformerDecoderLayer(
            width,
            n_heads,
            dim_feedforward=4 * width,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, n_layers, norm=nn.LayerNorm(width))
        self.readout = nn.Linear(width, vocab_size)

    def visual_tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.projector(inputs)  # (B, K, W)

    def logits(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, W) visual tokens and (B, L) ids -> (B, L, V) logits."""
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.position_embedding[:, :length]
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)
        hidden = self.decoder(
            x,
            memory,
            tgt_mask=causal,
            tgt_is_causal=True,
            tgt_key_padding_mask=tokens == self.pad_id,
        )
        return self.readout(hidden)

    def forward(self, inputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.visual_tokens(inputs), tokens)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean cross-entropy of tokens[:, 1:] given logits[:, :-1], padding ignored."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        tokens[:, 1:].reshape(-1),
        ignore_index=pad_id,
    )


@dataclass
class DecoderProbe:
    """A fitted decoder probe: ``generate(inputs) -> reports``."""

    network: ReportDecoder
    tokenizer: ReportTokenizer
    settings: DecoderSettings
    max_new_tokens: int
    validation_loss: float
    best_epoch: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    name = "decoder"

    @property
    def hyperparameters(self) -> dict[str, Any]:
        settings = {k: v for k, v in vars(self.settings).items() if k != "device"}
        return {
            **settings,
            "max_new_tokens": self.max_new_tokens,
            "epochs": self.best_epoch,
            "vocab_size": self.tokenizer.vocab_size,
        }

    @torch.no_grad()
    def generate(self, inputs: np.ndarray, *, beam_size: int | None = None) -> list[str]:
        """Reports for (n, T, D) visual inputs (deterministic)."""
        self.network.eval()
        inputs_t = torch.as_tensor(np.asarray(inputs, dtype=np.float32), device=self.device)
        memory = torch.cat(
            [self.network.visual_tokens(chunk) for chunk in inputs_t.split(64)]
        )  # (n, K, W)

        def step(rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
            logits = self.network.logits(memory[rows.to(self.device)], prefix.to(self.device))
            return logits[:, -1].float().log_softmax(dim=-1).cpu()

        ids = decode(
            step,
            len(inputs_t),
            bos_id=self.tokenizer.bos_id,
            eos_id=self.tokenizer.eos_id,
            max_new_tokens=self.max_new_tokens,
            beam_size=beam_size or self.settings.beam_size,
            length_penalty=self.settings.length_penalty,
            batch_size=max(1, 64 // (beam_size or self.settings.beam_size)),
        )
        return [self.tokenizer.decode(row) for row in ids]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the tokenizer (``tokenizer.json``) and the settings (``probe.json``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(folder / "tokenizer.json")
        atomic_write_text(
            folder / "probe.json",
            json.dumps(
                {
                    "probe": self.name,
                    "hyperparameters": self.hyperparameters,
                    "validation_loss": self.validation_loss,
                },
                indent=2,
            )
            + "\n",
        )
        return folder


def fit_decoder(
    inputs_train: np.ndarray,
    reports_train: Sequence[str],
    inputs_val: np.ndarray,
    reports_val: Sequence[str],
    *,
    settings: DecoderSettings | None = None,
    seed: int = 0,
) -> DecoderProbe:
    """Learn the tokenizer and the decoder on train; keep the epoch of lowest val loss.

    Args:
        inputs_train, inputs_val: (n, T, D) frozen visual inputs (T = 1 for a global vector).
        reports_train, reports_val: the reports of the same rows.
        seed: seeds initialisation, dropout and batch order (global torch RNG untouched);
            the same inputs and seed give the same weights and the same generated text.
    """
    settings = settings or DecoderSettings()
    inputs_train = _check_inputs(inputs_train, reports_train, "train")
    inputs_val = _check_inputs(inputs_val, reports_val, "val")
    if inputs_train.shape[1:] != inputs_val.shape[1:]:
        raise VoxelFMError(
            f"train and val visual inputs differ in shape: {inputs_train.shape[1:]} vs "
            f"{inputs_val.shape[1:]}"
        )
    tokenizer = ReportTokenizer.train(reports_train)
    train_sequences = tokenizer.sequences(reports_train, settings.max_length)
    val_sequences = tokenizer.sequences(reports_val, settings.max_length)
    longest = max(len(s) for s in train_sequences) - 1  # generated ids incl. EOS
    # Positions past max_length have no embedding, so generation stops there at the latest.
    max_new_tokens = min(settings.max_new_tokens or longest + 16, settings.max_length - 1)
    device = torch.device(settings.device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = ReportDecoder(
            inputs_train.shape[2],
            inputs_train.shape[1],
            tokenizer.vocab_size,
            width=settings.width,
            n_layers=settings.n_layers,
            n_heads=settings.n_heads,
            n_visual_tokens=settings.n_visual_tokens,
            dropout=settings.dropout,
            max_length=settings.max_length,
            pad_id=tokenizer.pad_id,
        ).to(device)
        train_x = torch.from_numpy(inputs_train).to(device)
        val_x = torch.from_numpy(inputs_val).to(device)

        def batch_loss(rows: np.ndarray) -> torch.Tensor:
            tokens = pad_sequences([train_sequences[i] for i in rows], tokenizer.pad_id)
            tokens = tokens.to(device)
            return next_token_loss(network(train_x[rows], tokens), tokens, tokenizer.pad_id)

        def val_loss() -> float:
            return _mean_token_loss(network, val_x, val_sequences, tokenizer.pad_id, device)

        result = train_on_val_loss(
            network,
            batch_loss,
            val_loss,
            len(train_sequences),
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            max_epochs=settings.max_epochs,
            patience=settings.patience,
            batch_size=settings.batch_size,
            generator=torch.Generator().manual_seed(seed),
        )
    return DecoderProbe(
        network,
        tokenizer,
        settings,
        max_new_tokens,
        result.best_val_loss,
        result.best_epoch,
        device,
    )


def _mean_token_loss(network, inputs, sequences, pad_id, device, batch_size=64) -> float:
    """Cross-entropy per predicted token over all sequences (not a mean of batch means)."""
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        tokens = pad_sequences(sequences[start : start + batch_size], pad_id).to(device)
        logits = network(inputs[start : start + batch_size], tokens)
        n_tokens = int((tokens[:, 1:] != pad_id).sum())
        total += float(next_token_loss(logits, tokens, pad_id)) * n_tokens
        count += n_tokens
    return total / max(count, 1)


def _check_inputs(inputs: np.ndarray, reports: Sequence[str], split: str) -> np.ndarray:
    inputs = np.asarray(inputs, dtype=np.float32)
    if inputs.ndim != 3:
        raise VoxelFMError(f"{split} visual inputs must be (n, T, D), got shape {inputs.shape}")
    if len(inputs) != len(reports) or len(inputs) == 0:
        raise VoxelFMError(
            f"{split}: {len(inputs)} visual inputs for {len(reports)} reports (need >= 1 each)"
        )
    if not np.isfinite(inputs).all():
        raise VoxelFMError(f"{split} visual inputs are not finite")
    return np.ascontiguousarray(inputs)
