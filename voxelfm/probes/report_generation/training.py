"""Teacher-forced training with model selection on the validation loss, shared by the probes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TrainingResult:
    """best_epoch: the epoch whose weights were kept (lowest validation loss)."""

    best_epoch: int
    best_val_loss: float
    epochs_run: int


def pad_sequences(sequences: Sequence[np.ndarray], pad_id: int) -> torch.Tensor:
    """(B, L) long tensor of the sequences right-padded to the longest."""
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for i, sequence in enumerate(sequences):
        out[i, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return out


def train_on_val_loss(
    module: nn.Module,
    batch_loss: Callable[[np.ndarray], torch.Tensor],
    val_loss: Callable[[], float],
    n_train: int,
    *,
    lr: float,
    weight_decay: float,
    max_epochs: int,
    patience: int,
    batch_size: int,
    generator: torch.Generator,
    max_grad_norm: float = 1.0,
) -> TrainingResult:
    """AdamW on the trainable parameters of ``module``; keeps the epoch of lowest val loss.

    Args:
        batch_loss: training row indices (b,) -> mean token loss (teacher forcing).
        val_loss: the validation loss per token, computed in eval mode without gradients.
        generator: orders the training rows each epoch (seeded, global RNG untouched).

    Only trainable parameters are snapshotted for the best epoch, so a large frozen language
    model under LoRA is never copied.
    """
    parameters = {name: p for name, p in module.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(parameters.values(), lr=lr, weight_decay=weight_decay)
    best_loss, best_epoch, best_state = math.inf, 0, None
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        module.train()
        for batch in torch.randperm(n_train, generator=generator).split(batch_size):
            loss = batch_loss(batch.numpy())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(parameters.values(), max_grad_norm)
            optimizer.step()
        module.eval()
        with torch.no_grad():
            loss_now = float(val_loss())
        if loss_now < best_loss:
            best_loss, best_epoch = loss_now, epoch
            best_state = {name: p.detach().clone() for name, p in parameters.items()}
        elif epoch - best_epoch >= patience:
            break
    if best_state is not None:
        with torch.no_grad():
            for name, value in best_state.items():
                parameters[name].copy_(value)
    module.eval()
    return TrainingResult(best_epoch, best_loss, epoch)
