"""MLP regression probe with early stopping on validation R^2."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler
from torch import nn

from voxelfm.probes.fitted import FittedProbe, as_probe_inputs
from voxelfm.probes.networks import MLPHead, TorchPredictor, train_with_early_stopping
from voxelfm.probes.regression import as_regression_targets, r_squared


def fit_select_mlp_regressor(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    hidden_dim: int = 256,
    dropout: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    max_epochs: int = 300,
    patience: int = 20,
    batch_size: int = 64,
    seed: int = 0,
) -> FittedProbe:
    """One-hidden-layer MLP on standardised features; the epoch is chosen on validation R^2.

    The target is standardised with training statistics for the MSE loss (so one learning
    rate suits ages in years and volumes in mL alike) and mapped back for prediction.
    """
    X_train, y_train = as_probe_inputs(X_train, as_regression_targets(y_train, "train"), "train")
    X_val, y_val = as_probe_inputs(X_val, as_regression_targets(y_val, "val"), "val")
    scaler = StandardScaler().fit(X_train)
    y_mean, y_scale = float(y_train.mean()), float(y_train.std()) or 1.0
    targets = torch.as_tensor((y_train - y_mean) / y_scale, dtype=torch.float32)[:, None]  # (n, 1)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = MLPHead(X_train.shape[1], hidden_dim, 1, dropout)
        predictor = TorchPredictor(
            network, scaler=scaler, output_scale=y_scale, output_shift=y_mean, batch_size=1024
        )
        result = train_with_early_stopping(
            network,
            nn.MSELoss(),
            predictor.prepare(X_train),
            targets,
            lambda: r_squared(y_val, predictor(X_val)),
            lr=lr,
            weight_decay=weight_decay,
            max_epochs=max_epochs,
            patience=patience,
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(seed),
        )
    return FittedProbe(
        task="regression",
        name="mlp",
        hyperparameters={
            "hidden_dim": hidden_dim,
            "dropout": dropout,
            "lr": lr,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "epochs": result.best_epoch,
        },
        validation_score=result.best_score,
        predict=predictor,
        selection_trace=result.trace,
    )
