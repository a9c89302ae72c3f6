"""Soft-argmax localisation probe: where in the scan is the structure (RAS world mm)?

A light head on frozen patch tokens scores every token; the softmax of the scores over the
scan's token grid weights the tokens' patch centres (world mm, from the scan's own
``grid_affine``), and the weighted mean is the predicted position. Each token may also
nudge its centre by a learned offset of at most half a token step along each grid axis, so
the prediction is not confined to the convex hull of patch centres at token resolution.

Scans have token grids of different shapes: a minibatch is padded to its largest grid and
the padding is masked out of the softmax.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from voxelfm.errors import VoxelFMError

# Loss and validation work in decimetres: position errors of tens of mm become O(0.1-1).
_LOSS_SCALE_MM = 100.0
# smooth L1 switches from quadratic to linear at this error (in loss units: 10 mm).
_SMOOTH_L1_BETA = 0.1


def token_centres_mm(grid_shape: Sequence[int], grid_affine: np.ndarray) -> np.ndarray:
    """(gx, gy, gz, 3) RAS mm of every token's patch centre (as ``Features.token_centres``)."""
    grid_affine = np.asarray(grid_affine, dtype=np.float64)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in grid_shape), indexing="ij"), -1)
    return index @ grid_affine[:3, :3].T + grid_affine[:3, 3]


def world_to_token_index(xyz_mm: np.ndarray, grid_affine: np.ndarray) -> np.ndarray:
    """RAS mm (..., 3) -> continuous token index (..., 3); rounding gives the nearest token."""
    inverse = np.linalg.inv(np.asarray(grid_affine, dtype=np.float64))
    return np.asarray(xyz_mm, dtype=np.float64) @ inverse[:3, :3].T + inverse[:3, 3]


class SoftArgmaxHead(nn.Module):
    """Per-token attention logit (+ bounded offset) -> softmax-weighted mean of token centres.

    Args:
        token_dim: D, the width of the patch tokens.
        hidden_dim: width of the hidden layer of the scoring MLP; 0 for LayerNorm + linear.
        learn_offset: let every token move its centre by up to half a token step per axis.
    """

    def __init__(self, token_dim: int, hidden_dim: int = 64, learn_offset: bool = True):
        super().__init__()
        # Frozen tokens of different backbones differ wildly in scale; normalise first.
        self.token_norm = nn.LayerNorm(token_dim)
        if hidden_dim > 0:
            self.body: nn.Module = nn.Sequential(nn.Linear(token_dim, hidden_dim), nn.GELU())
            width = hidden_dim
        else:
            self.body = nn.Identity()
            width = token_dim
        self.logit = nn.Linear(width, 1)
        self.offset = nn.Linear(width, 3) if learn_offset else None
        if self.offset is not None:  # start at the patch centres
            nn.init.zeros_(self.offset.weight)
            nn.init.zeros_(self.offset.bias)

    def forward(
        self,
        tokens: torch.Tensor,
        centres: torch.Tensor,
        steps: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted RAS mm and the attention over tokens.

        Args:
            tokens: (B, T, D) patch tokens (T: the largest grid of the batch, flattened).
            centres: (B, T, 3) RAS mm of each token's patch centre.
            steps: (B, 3, 3) the grid_affine's linear part (a token index step in mm).
            mask: (B, T) True for real tokens, False for padding.

        Returns:
            (B, 3) positions in mm and (B, T) softmax weights (0 on padding).
        """
        hidden = self.body(self.token_norm(tokens))  # (B, T, h)
        logits = self.logit(hidden)[..., 0].masked_fill(~mask, float("-inf"))  # (B, T)
        weights = torch.softmax(logits, dim=1)  # (B, T)
        points = centres
        if self.offset is not None:
            # tanh bounds the offset to half a token step along each grid axis.
            offset_index = 0.5 * torch.tanh(self.offset(hidden))  # (B, T, 3) in token steps
            points = centres + torch.einsum("bij,btj->bti", steps, offset_index)
        return torch.einsum("bt,bti->bi", weights, points), weights


@dataclass
class TokenGrids:
    """Patch tokens of several scans, flattened per scan, ready to batch.

    tokens:  list of (T_n, D) float32 tensors (C-order flattening of (gx, gy, gz)).
    centres: list of (T_n, 3) float32 RAS mm of the patch centres.
    steps:   (n, 3, 3) float32 linear part of each scan's grid_affine.
    """

    tokens: list[torch.Tensor]
    centres: list[torch.Tensor]
    steps: torch.Tensor

    @classmethod
    def from_arrays(
        cls, grids: Sequence[tuple[np.ndarray, np.ndarray]], what: str = "tokens"
    ) -> TokenGrids:
        """``grids``: per scan, (gx, gy, gz, D) tokens and their (4, 4) grid_affine."""
        if len(grids) == 0:
            raise VoxelFMError(f"{what}: no scans")
        tokens, centres, steps = [], [], []
        dims = set()
        for array, affine in grids:
            array = np.asarray(array, dtype=np.float32)
            affine = np.asarray(affine, dtype=np.float64)
            if array.ndim != 4 or affine.shape != (4, 4):
                raise VoxelFMError(
                    f"{what}: expected (gx, gy, gz, D) tokens and a 4x4 grid affine, got "
                    f"{array.shape} and {affine.shape}"
                )
            if not np.isfinite(array).all():
                raise VoxelFMError(f"{what}: patch tokens hold non-finite values")
            dims.add(array.shape[-1])
            tokens.append(torch.from_numpy(array.reshape(-1, array.shape[-1])))
            centres.append(
                torch.from_numpy(token_centres_mm(array.shape[:3], affine).reshape(-1, 3)).float()
            )
            steps.append(affine[:3, :3])
        if len(dims) != 1:
            raise VoxelFMError(f"{what}: scans have different token widths {sorted(dims)}")
        return cls(tokens, centres, torch.from_numpy(np.stack(steps)).float())

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def token_dim(self) -> int:
        return int(self.tokens[0].shape[1])

    def batch(
        self, rows: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D) tokens, (B, T, 3) centres, (B, 3, 3) steps, (B, T) mask for ``rows``."""
        rows = [int(r) for r in rows]
        longest = max(len(self.tokens[r]) for r in rows)
        tokens = torch.zeros(len(rows), longest, self.token_dim)
        centres = torch.zeros(len(rows), longest, 3)
        mask = torch.zeros(len(rows), longest, dtype=torch.bool)
        for b, r in enumerate(rows):
            n = len(self.tokens[r])
            tokens[b, :n] = self.tokens[r]
            centres[b, :n] = self.centres[r]
            mask[b, :n] = True
        return tokens, centres, self.steps[rows], mask


def predict_positions(
    network: SoftArgmaxHead, grids: TokenGrids, batch_size: int = 8
) -> np.ndarray:
    """(n, 3) float64 predicted RAS mm, eval mode, no gradients."""
    was_training = network.training
    network.eval()
    out = []
    with torch.no_grad():
        for first in range(0, len(grids), batch_size):
            rows = range(first, min(first + batch_size, len(grids)))
            positions, _ = network(*grids.batch(rows))
            out.append(positions.double().numpy())
    network.train(was_training)
    return np.concatenate(out)


def euclidean_errors_mm(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(n,) Euclidean distance in mm between (n, 3) true and predicted positions."""
    return np.linalg.norm(np.asarray(y_true, float) - np.asarray(y_pred, float), axis=1)


@dataclass
class FittedLocaliser:
    """A trained soft-argmax probe chosen on validation.

    validation_score: mean Euclidean error in mm on val (lower is better).
    selection_trace: one entry per (lr, weight_decay) tried, with its best epoch and score.
    """

    network: SoftArgmaxHead
    hyperparameters: dict[str, Any]
    validation_score: float
    selection_trace: list[dict[str, Any]] = field(default_factory=list)
    batch_size: int = 8

    def predict(self, grids: Sequence[tuple[np.ndarray, np.ndarray]] | TokenGrids) -> np.ndarray:
        """(n, 3) RAS mm for the scans' (tokens, grid_affine) pairs."""
        if not isinstance(grids, TokenGrids):
            grids = TokenGrids.from_arrays(grids)
        return predict_positions(self.network, grids, self.batch_size)


def _check_targets(y: np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (n, 3):
        raise VoxelFMError(f"{what}: expected ({n}, 3) positions in mm, got {y.shape}")
    if not np.isfinite(y).all():
        raise VoxelFMError(f"{what}: positions hold missing or non-finite values")
    return y


def fit_select_soft_argmax(
    train: Sequence[tuple[np.ndarray, np.ndarray]] | TokenGrids,
    y_train: np.ndarray,
    val: Sequence[tuple[np.ndarray, np.ndarray]] | TokenGrids,
    y_val: np.ndarray,
    *,
    lrs: Sequence[float] = (1e-3, 3e-3),
    weight_decays: Sequence[float] = (1e-4, 1e-2),
    hidden_dim: int = 64,
    learn_offset: bool = True,
    max_epochs: int = 200,
    patience: int = 20,
    batch_size: int = 8,
    seed: int = 0,
) -> FittedLocaliser:
    """Train the soft-argmax probe for each (lr, weight decay); keep the best on val.

    Each setting trains with AdamW on the smooth L1 loss of the position in units of
    100 mm and keeps its epoch with the lowest mean Euclidean error on val (early stopping
    after ``patience`` epochs without improvement); the setting with the lowest val error
    wins. Deterministic on CPU for a given ``seed`` (the global torch RNG is untouched).

    Args:
        train, val: per scan, ((gx, gy, gz, D) tokens, (4, 4) token index -> RAS mm affine).
        y_train, y_val: (n, 3) true RAS positions in mm.
    """
    train_grids = train if isinstance(train, TokenGrids) else TokenGrids.from_arrays(train, "train")
    val_grids = val if isinstance(val, TokenGrids) else TokenGrids.from_arrays(val, "val")
    y_train = _check_targets(y_train, len(train_grids), "train")
    y_val = _check_targets(y_val, len(val_grids), "val")
    if train_grids.token_dim != val_grids.token_dim:
        raise VoxelFMError("train and val tokens have different widths")
    targets = torch.from_numpy(y_train / _LOSS_SCALE_MM).float()

    best: FittedLocaliser | None = None
    trace = []
    for lr, weight_decay in itertools.product(lrs, weight_decays):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = SoftArgmaxHead(train_grids.token_dim, hidden_dim, learn_offset)
            epoch, score = _train(
                network,
                train_grids,
                targets,
                lambda net: float(
                    euclidean_errors_mm(y_val, predict_positions(net, val_grids, batch_size)).mean()
                ),
                lr=lr,
                weight_decay=weight_decay,
                max_epochs=max_epochs,
                patience=patience,
                batch_size=batch_size,
                generator=torch.Generator().manual_seed(seed),
            )
        trace.append(
            {"lr": lr, "weight_decay": weight_decay, "epochs": epoch, "val_mean_error_mm": score}
        )
        if best is None or score < best.validation_score:
            best = FittedLocaliser(
                network=network,
                hyperparameters={
                    "lr": lr,
                    "weight_decay": weight_decay,
                    "hidden_dim": hidden_dim,
                    "learn_offset": learn_offset,
                    "batch_size": batch_size,
                    "epochs": epoch,
                },
                validation_score=score,
                batch_size=batch_size,
            )
    assert best is not None
    best.selection_trace = trace
    return best


def _train(
    network: SoftArgmaxHead,
    grids: TokenGrids,
    targets: torch.Tensor,
    validation_error,
    *,
    lr: float,
    weight_decay: float,
    max_epochs: int,
    patience: int,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[int, float]:
    """AdamW with early stopping on the val error; loads the best weights. (epoch, error)."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.SmoothL1Loss(beta=_SMOOTH_L1_BETA)
    best_error, best_epoch = np.inf, 0
    best_state = copy.deepcopy(network.state_dict())
    for epoch in range(1, max_epochs + 1):
        network.train()
        for rows in torch.randperm(len(grids), generator=generator).split(batch_size):
            optimizer.zero_grad()
            positions, _ = network(*grids.batch(rows.tolist()))
            loss_fn(positions / _LOSS_SCALE_MM, targets[rows]).backward()
            optimizer.step()
        error = validation_error(network)
        if np.isfinite(error) and error < best_error:
            best_error, best_epoch = error, epoch
            best_state = copy.deepcopy(network.state_dict())
        elif epoch - best_epoch >= patience:
            break
    if best_epoch == 0:
        raise VoxelFMError("soft_argmax: no epoch gave a finite validation error")
    network.load_state_dict(best_state)
    network.eval()
    return best_epoch, float(best_error)
