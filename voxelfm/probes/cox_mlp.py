"""MLP Cox head: a network risk score trained on the Cox partial likelihood (Breslow ties)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler

from voxelfm.probes.fitted import FittedProbe, as_probe_inputs
from voxelfm.probes.networks import MLPHead, TorchPredictor, train_with_early_stopping
from voxelfm.probes.survival import as_survival_targets, harrell_c_index


def cox_negative_log_partial_likelihood(risk: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow's tie handling, averaged over events.

    For each event i: -(risk_i - log sum_{j: t_j >= t_i} exp(risk_j)). Under Breslow every
    subject tied at t_i stays in the risk set of the others, so the log-sum runs to the *last*
    position of the tie group in descending time order, not to the subject's own position.

    Args:
        risk: (n,) or (n, 1) log-hazard scores.
        y: (n, 2) float (time, event).
    """
    risk = risk.reshape(-1)
    order = torch.argsort(y[:, 0], descending=True)
    risk, time, event = risk[order], y[order, 0], y[order, 1]
    log_cumulative = torch.logcumsumexp(risk, dim=0)  # log sum over the i longest survivors
    negative_time = -time.contiguous()  # ascending, as searchsorted needs
    end_of_tie_group = torch.searchsorted(negative_time, negative_time, right=True) - 1
    log_risk_set = log_cumulative[end_of_tie_group]
    return -((risk - log_risk_set) * event).sum() / event.sum().clamp(min=1.0)


def fit_select_mlp_cox(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    hidden_dim: int = 64,
    dropout: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    max_epochs: int = 300,
    patience: int = 20,
    seed: int = 0,
) -> FittedProbe:
    """MLP risk score on standardised features; the epoch is chosen on validation C-index.

    Training is full-batch: the partial likelihood of an event compares it with everyone
    still at risk, which minibatches would truncate.
    """
    X_train, y_train = as_probe_inputs(X_train, as_survival_targets(y_train, "train"), "train")
    X_val, y_val = as_probe_inputs(X_val, as_survival_targets(y_val, "val"), "val")
    scaler = StandardScaler().fit(X_train)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = MLPHead(X_train.shape[1], hidden_dim, 1, dropout)
        predictor = TorchPredictor(network, scaler=scaler, batch_size=1024)
        result = train_with_early_stopping(
            network,
            cox_negative_log_partial_likelihood,
            predictor.prepare(X_train),
            torch.as_tensor(y_train, dtype=torch.float32),
            lambda: harrell_c_index(y_val, predictor(X_val)),
            lr=lr,
            weight_decay=weight_decay,
            max_epochs=max_epochs,
            patience=patience,
            batch_size=None,
            generator=torch.Generator().manual_seed(seed),
        )
    return FittedProbe(
        task="survival",
        name="mlp_cox",
        hyperparameters={
            "hidden_dim": hidden_dim,
            "dropout": dropout,
            "lr": lr,
            "weight_decay": weight_decay,
            "epochs": result.best_epoch,
        },
        validation_score=result.best_score,
        predict=predictor,
        selection_trace=result.trace,
    )
