"""Shared torch machinery of the network probes: an MLP head, early stopping, prediction.

Only the network probes (``attentive``, ``mlp_regression``, ``cox_mlp``) import this module,
so the classical probes never import torch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler
from torch import nn

from voxelfm.errors import VoxelFMError


class MLPHead(nn.Module):
    """One hidden layer: (B, d) -> (B, n_outputs). Small on purpose: a probe, not a model."""

    def __init__(self, in_dim: int, hidden_dim: int, n_outputs: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, n_outputs),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class TorchPredictor:
    """A trained network as a numpy predictor: (n, ...) inputs -> (n,) or (n, k) scores.

    Inputs are standardised with the training ``scaler`` (if any); outputs go through
    ``activation`` and then ``output_shift + output_scale * y`` (to undo target scaling).
    A single output column is squeezed to (n,).
    """

    def __init__(
        self,
        network: nn.Module,
        activation: Literal["identity", "sigmoid", "softmax"] = "identity",
        scaler: StandardScaler | None = None,
        output_scale: float = 1.0,
        output_shift: float = 0.0,
        batch_size: int = 256,
    ):
        self.network = network.eval()
        self.activation = activation
        self.scaler = scaler
        self.output_scale = output_scale
        self.output_shift = output_shift
        self.batch_size = batch_size

    def __call__(self, X: np.ndarray) -> np.ndarray:
        outputs = raw_outputs(self.network, self.prepare(X), self.batch_size)
        if self.activation == "sigmoid":
            outputs = torch.sigmoid(outputs)
        elif self.activation == "softmax":
            outputs = torch.softmax(outputs, dim=1)
        scores = self.output_shift + self.output_scale * outputs.double().numpy()
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def prepare(self, X: np.ndarray) -> torch.Tensor:
        """Float32 tensor of standardised inputs."""
        X = np.asarray(X, dtype=np.float32)
        if self.scaler is not None:
            X = self.scaler.transform(X).astype(np.float32)
        return torch.from_numpy(X)


def raw_outputs(network: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Network outputs (n, k) in eval mode without gradients, batched to bound memory."""
    was_training = network.training
    network.eval()
    with torch.no_grad():
        outputs = torch.cat([network(batch) for batch in inputs.split(batch_size)])
    network.train(was_training)
    return outputs


@dataclass(frozen=True)
class EarlyStoppingResult:
    """Best epoch (1-based) by validation score, that score, and the per-epoch scores."""

    best_epoch: int
    best_score: float
    validation_history: tuple[float, ...]

    @property
    def trace(self) -> tuple[dict[str, float], ...]:
        """Per-epoch validation scores in the ``FittedProbe.selection_trace`` format."""
        return tuple(
            {"epoch": epoch, "validation_score": score}
            for epoch, score in enumerate(self.validation_history, start=1)
        )


def train_with_early_stopping(
    network: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_inputs: torch.Tensor,
    train_targets: torch.Tensor,
    validation_score: Callable[[], float],
    *,
    lr: float,
    weight_decay: float,
    max_epochs: int,
    patience: int,
    batch_size: int | None,
    generator: torch.Generator,
) -> EarlyStoppingResult:
    """AdamW training that keeps the weights of the epoch with the best validation score.

    Training stops after ``patience`` epochs without improvement; the best weights are
    loaded back into ``network`` before returning.

    Args:
        loss_fn: (outputs (B, k), targets (B, ...)) -> scalar loss.
        validation_score: evaluates the current ``network`` on validation (higher is better).
        batch_size: minibatch size; None for full-batch steps (needed by losses over the
            whole risk set, such as the Cox partial likelihood).
        generator: seeded generator for the minibatch order.
    """
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(train_inputs)
    best_score, best_epoch, best_state = -np.inf, 0, copy.deepcopy(network.state_dict())
    history = []
    for epoch in range(1, max_epochs + 1):
        network.train()
        order = torch.randperm(n, generator=generator)
        for batch in order.split(batch_size or n):
            optimizer.zero_grad()
            loss_fn(network(train_inputs[batch]), train_targets[batch]).backward()
            optimizer.step()
        score = float(validation_score())
        history.append(score)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(network.state_dict())
        elif epoch - best_epoch >= patience:
            break
    if best_epoch == 0:
        raise VoxelFMError(f"no epoch gave a finite validation score: {history[:5]}...")
    network.load_state_dict(best_state)
    network.eval()
    return EarlyStoppingResult(best_epoch, float(best_score), tuple(history))
