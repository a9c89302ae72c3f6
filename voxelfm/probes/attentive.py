"""Attentive-pooling classification probe over frozen patch tokens.

A single learned query cross-attends over a scan's patch tokens, so the probe can weight the
few patches that carry a focal finding instead of averaging them away as mean pooling does.
Same structure as the reference implementation's ``QFormer`` head.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from voxelfm.probes.classification import (
    LabelKind,
    auroc,
    check_training_labels,
    youden_threshold,
)
from voxelfm.probes.fitted import FittedProbe, as_probe_inputs
from voxelfm.probes.networks import TorchPredictor, train_with_early_stopping


class AttentivePoolingHead(nn.Module):
    """(B, N, d) patch tokens -> (B, n_outputs) logits via one learned query."""

    def __init__(
        self, token_dim: int, hidden_dim: int, n_heads: int, n_outputs: int, dropout: float
    ):
        super().__init__()
        # Frozen tokens from different backbones differ wildly in scale; normalise first.
        self.token_norm = nn.LayerNorm(token_dim)
        self.project = nn.Linear(token_dim, hidden_dim)
        self.query = nn.Parameter(0.02 * torch.randn(1, 1, hidden_dim))
        self.attention = nn.MultiheadAttention(
            hidden_dim, n_heads, dropout=dropout, batch_first=True
        )
        self.readout = nn.Sequential(
            nn.LayerNorm(hidden_dim), nn.Dropout(dropout), nn.Linear(hidden_dim, n_outputs)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.project(self.token_norm(tokens))  # (B, N, h)
        query = self.query.expand(len(tokens), -1, -1)  # (B, 1, h)
        pooled, _ = self.attention(query, keys, keys, need_weights=False)  # (B, 1, h)
        return self.readout(pooled[:, 0])  # (B, n_outputs)


def _loss_and_targets(kind: LabelKind, y_train: np.ndarray):
    """The training loss for the label kind and the targets as the tensor it expects."""
    if kind == "multiclass":
        return nn.CrossEntropyLoss(), torch.as_tensor(y_train, dtype=torch.long)
    targets = torch.as_tensor(y_train, dtype=torch.float32).reshape(len(y_train), -1)
    return nn.BCEWithLogitsLoss(), targets  # binary: (n, 1); multi-label: (n, L)


def fit_select_attentive(
    tokens_train: np.ndarray,
    y_train: np.ndarray,
    tokens_val: np.ndarray,
    y_val: np.ndarray,
    *,
    hidden_dim: int = 128,
    n_heads: int = 4,
    dropout: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    max_epochs: int = 100,
    patience: int = 10,
    batch_size: int = 32,
    seed: int = 0,
) -> FittedProbe:
    """Train the attentive probe on train; the epoch is chosen by early stopping on val AUROC.

    Args:
        tokens_train, tokens_val: (n, N, d) patch tokens, the same N for every scan.
        y_train, y_val: labels (see ``classification``).
        seed: seeds initialisation, dropout and batch order (global torch RNG untouched).
    """
    tokens_train, y_train = as_probe_inputs(tokens_train, y_train, "train", feature_ndim=3)
    tokens_val, y_val = as_probe_inputs(tokens_val, y_val, "val", feature_ndim=3)
    kind = check_training_labels(y_train)
    n_outputs = {"binary": 1, "multiclass": int(y_train.max()) + 1}.get(kind, y_train.shape[-1])
    loss, targets = _loss_and_targets(kind, y_train)
    activation = "softmax" if kind == "multiclass" else "sigmoid"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = AttentivePoolingHead(
            tokens_train.shape[2], hidden_dim, n_heads, n_outputs, dropout
        )
        predictor = TorchPredictor(network, activation=activation, batch_size=batch_size)
        result = train_with_early_stopping(
            network,
            loss,
            torch.from_numpy(tokens_train),
            targets,
            lambda: auroc(y_val, predictor(tokens_val)),
            lr=lr,
            weight_decay=weight_decay,
            max_epochs=max_epochs,
            patience=patience,
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(seed),
        )
    return FittedProbe(
        task="classification",
        name="attentive",
        hyperparameters={
            "hidden_dim": hidden_dim,
            "n_heads": n_heads,
            "dropout": dropout,
            "lr": lr,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "epochs": result.best_epoch,
        },
        validation_score=result.best_score,
        predict=predictor,
        decision_threshold=youden_threshold(y_val, predictor(tokens_val)),
        selection_trace=result.trace,
    )
