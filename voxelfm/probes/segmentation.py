"""Convolutional decoder probe: voxel-level segmentation from frozen patch tokens.

Token (i, j, k) of a backbone with patch size p covers voxels ``[i*p, (i+1)*p) x ...`` of
the canonical grid it was extracted from (``voxelfm.extract.extractor``). The decoder maps
a (gx, gy, gz) token grid to (gx*p, gy*p, gz*p) class logits: a 1x1x1 projection, then
``floor(log2 p)`` blocks each doubling the resolution (2x2x2 stride-2 transposed
convolution, norm, GELU), a trilinear resize for any remaining non-power-of-two factor, and
a 1x1x1 classifier. Norms act per voxel over channels, so the decoder's output at a voxel
does not depend on the rest of the crop: training crops and inference windows see the same
function.

Training draws random crops of the token grid (half of them centred near foreground) with
the matching voxel block of the label map and minimises Dice + cross-entropy
(``monai.losses.DiceCELoss``). Whole scans are predicted by sliding a window of the training
crop size over the token grid (``monai.inferers.sliding_window_inference``), so scans of any
size work. The epoch with the best mean validation Dice is kept.

Dice convention (``dice_per_class``): a class absent from both the truth and the prediction
of a scan has no Dice on that scan (NaN); it is left out of that scan's macro mean and of
the class's mean over scans. Present in one but not the other gives 0.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voxelfm.errors import VoxelFMError


class ChannelNorm(nn.Module):
    """LayerNorm over channels at every voxel of a (B, C, X, Y, Z) tensor."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class ConvDecoder(nn.Module):
    """(B, D, gx, gy, gz) patch tokens -> (B, n_classes, gx*p, gy*p, gz*p) logits.

    Args:
        token_dim: D.
        n_classes: output classes, background included.
        patch_size: p, voxels per token along each axis.
        width: channels after the projection; each upsampling block halves them, down to
            ``min_width``.
    """

    def __init__(
        self,
        token_dim: int,
        n_classes: int,
        patch_size: int,
        width: int = 64,
        min_width: int = 16,
    ):
        super().__init__()
        if patch_size < 1 or n_classes < 2:
            raise VoxelFMError(
                f"conv_decoder: patch_size must be >= 1 and n_classes >= 2, got {patch_size}, "
                f"{n_classes}"
            )
        self.patch_size = int(patch_size)
        # Frozen tokens of different backbones differ wildly in scale; normalise first.
        self.project = nn.Sequential(
            ChannelNorm(token_dim), nn.Conv3d(token_dim, width, 1), ChannelNorm(width), nn.GELU()
        )
        blocks = []
        channels = width
        self.n_doublings = self.patch_size.bit_length() - 1  # floor(log2 p), exactly
        for _ in range(self.n_doublings):
            out_channels = max(min_width, channels // 2)
            blocks += [
                nn.ConvTranspose3d(channels, out_channels, kernel_size=2, stride=2),
                ChannelNorm(out_channels),
                nn.GELU(),
            ]
            channels = out_channels
        self.upsample = nn.Sequential(*blocks)
        self.classifier = nn.Conv3d(channels, n_classes, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        size = [n * self.patch_size for n in tokens.shape[2:]]
        x = self.upsample(self.project(tokens))  # (B, c, g * 2**n_doublings)
        if list(x.shape[2:]) != size:  # non-power-of-two patch size
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        return self.classifier(x)


@dataclass
class SegmentationScan:
    """One scan for the decoder probe.

    tokens: (gx, gy, gz, D) patch tokens.
    labels: (X, Y, Z) class indices (0 = background) on the voxel grid the tokens came
        from, token (0, 0, 0) covering voxels [0, p)^3; None for scans only predicted.
    """

    tokens: np.ndarray
    labels: np.ndarray | None = None

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.tokens.shape[:3])  # type: ignore[return-value]


def padded_labels(labels: np.ndarray, grid_shape: Sequence[int], patch_size: int) -> np.ndarray:
    """(gx*p, gy*p, gz*p) labels: the voxels of tokens beyond the volume read background.

    The extractor pads the volume with air up to whole patches; those voxels hold no
    structure, so background is their truth.
    """
    target = tuple(int(g) * patch_size for g in grid_shape)
    if any(n > t for n, t in zip(labels.shape, target)):
        raise VoxelFMError(
            f"label map {labels.shape} is larger than the token grid {tuple(grid_shape)} x "
            f"patch {patch_size} covers"
        )
    out = np.zeros(target, dtype=np.int64)
    out[: labels.shape[0], : labels.shape[1], : labels.shape[2]] = labels
    return out


def confusion_counts(truth: np.ndarray, prediction: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) voxel counts: row = true class, column = predicted class."""
    truth = np.asarray(truth).ravel().astype(np.int64)
    prediction = np.asarray(prediction).ravel().astype(np.int64)
    if truth.shape != prediction.shape:
        raise ValueError(f"truth has {truth.size} voxels, prediction {prediction.size}")
    if truth.size and (
        max(truth.max(), prediction.max()) >= n_classes or min(truth.min(), prediction.min()) < 0
    ):
        raise ValueError(f"class indices must lie in [0, {n_classes})")
    return np.bincount(truth * n_classes + prediction, minlength=n_classes**2).reshape(
        n_classes, n_classes
    )


def dice_per_class(confusion: np.ndarray) -> np.ndarray:
    """(C - 1,) Dice of the foreground classes 1..C-1; NaN where absent in both."""
    intersection = np.diag(confusion)[1:].astype(np.float64)
    denominator = confusion.sum(0)[1:] + confusion.sum(1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * intersection / denominator, np.nan)


def dice_micro(confusion: np.ndarray) -> float:
    """Dice of the foreground voxels pooled over classes: 2 sum_c I_c / sum_c (P_c + T_c)."""
    intersection = np.diag(confusion)[1:].sum()
    denominator = confusion.sum(0)[1:].sum() + confusion.sum(1)[1:].sum()
    return float(2 * intersection / denominator) if denominator > 0 else float("nan")


def nanmean(values: np.ndarray, axis=None):
    """np.nanmean without the all-NaN warning (the result is NaN there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def dice_macro(confusion: np.ndarray) -> float:
    """Mean Dice over the foreground classes present in the truth or the prediction."""
    return float(nanmean(dice_per_class(confusion)))


@dataclass
class FittedSegmenter:
    """A trained decoder chosen on validation (validation_score: mean macro Dice on val)."""

    network: ConvDecoder
    n_classes: int
    crop_tokens: int
    hyperparameters: dict[str, Any]
    validation_score: float
    selection_trace: list[dict[str, Any]] = field(default_factory=list)
    sw_batch_size: int = 4
    overlap: float = 0.25
    device: str = "cpu"

    def predict_logits(self, tokens: np.ndarray) -> torch.Tensor:
        """(gx, gy, gz, D) tokens -> (n_classes, gx*p, gy*p, gz*p) float32 logits on CPU."""
        return predict_logits(
            self.network, tokens, self.crop_tokens, self.sw_batch_size, self.overlap, self.device
        )

    def predict(self, tokens: np.ndarray, volume_shape: Sequence[int] | None = None) -> np.ndarray:
        """(X, Y, Z) uint8/uint16 class indices, cropped to ``volume_shape`` when given."""
        labels = self.predict_logits(tokens).argmax(0).numpy()
        if volume_shape is not None:
            labels = labels[tuple(slice(0, int(n)) for n in volume_shape)]
        return labels.astype(np.uint8 if self.n_classes <= 256 else np.uint16)


def predict_logits(
    network: nn.Module,
    tokens: np.ndarray,
    crop_tokens: int,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    device: str = "cpu",
) -> torch.Tensor:
    """Sliding-window logits over a whole token grid: (n_classes, gx*p, gy*p, gz*p), CPU."""
    from monai.inferers import sliding_window_inference

    inputs = torch.as_tensor(np.asarray(tokens, dtype=np.float32)).permute(3, 0, 1, 2)[None]
    was_training = network.training
    network.eval()
    with torch.no_grad():
        logits = sliding_window_inference(
            inputs.to(device),
            roi_size=(crop_tokens,) * 3,
            sw_batch_size=sw_batch_size,
            predictor=network,
            overlap=overlap,
            mode="gaussian",
        )
    network.train(was_training)
    return logits[0].float().cpu()


def _foreground_tokens(labels: np.ndarray, grid_shape: Sequence[int], p: int) -> np.ndarray:
    """(k, 3) indices of the tokens whose voxel block holds foreground."""
    g = [int(n) for n in grid_shape]
    blocks = (labels > 0).reshape(g[0], p, g[1], p, g[2], p).any(axis=(1, 3, 5))
    return np.argwhere(blocks)


class _CropSampler:
    """Random (tokens, labels) training crops of ``crop`` tokens per axis.

    A grid smaller than the crop along an axis is padded (zero tokens, background labels),
    so every crop of a batch has the same shape.
    """

    def __init__(
        self,
        scans: Sequence[SegmentationScan],
        patch_size: int,
        crop: int,
        foreground_fraction: float,
        rng: np.random.Generator,
    ):
        self.p, self.crop, self.rng = patch_size, crop, rng
        self.foreground_fraction = foreground_fraction
        self.tokens = [torch.from_numpy(np.asarray(s.tokens, dtype=np.float32)) for s in scans]
        self.labels = [
            torch.from_numpy(padded_labels(s.labels, s.grid_shape, patch_size)) for s in scans
        ]
        self.foreground = [
            _foreground_tokens(labels.numpy(), s.grid_shape, patch_size)
            for labels, s in zip(self.labels, scans)
        ]

    def _start(self, scan: int) -> list[int]:
        grid = self.tokens[scan].shape[:3]
        spans = [max(0, g - self.crop) for g in grid]
        foreground = self.foreground[scan]
        if len(foreground) and self.rng.random() < self.foreground_fraction:
            centre = foreground[self.rng.integers(len(foreground))]
            # A random position of the foreground token inside the crop.
            return [
                int(np.clip(c - self.rng.integers(min(self.crop, g)), 0, s))
                for c, g, s in zip(centre, grid, spans)
            ]
        return [int(self.rng.integers(s + 1)) for s in spans]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, c, c, c) tokens and (B, 1, c*p, c*p, c*p) long labels."""
        c, p = self.crop, self.p
        dim = self.tokens[0].shape[-1]
        tokens = torch.zeros(size, dim, c, c, c)
        labels = torch.zeros(size, 1, c * p, c * p, c * p, dtype=torch.long)
        for b in range(size):
            scan = int(self.rng.integers(len(self.tokens)))
            start = self._start(scan)
            block = self.tokens[scan][tuple(slice(s, s + c) for s in start)]  # (<=c,)*3 + (D,)
            tokens[(b, slice(None), *(slice(0, n) for n in block.shape[:3]))] = block.permute(
                3, 0, 1, 2
            )
            voxels = self.labels[scan][tuple(slice(s * p, (s + c) * p) for s in start)]
            labels[(b, 0, *(slice(0, n) for n in voxels.shape))] = voxels
        return tokens, labels


def _check_scans(scans: Sequence[SegmentationScan], what: str, need_labels: bool) -> int:
    if len(scans) == 0:
        raise VoxelFMError(f"conv_decoder: no {what} scans")
    dims = {int(np.asarray(s.tokens).shape[-1]) for s in scans}
    if len(dims) != 1 or any(np.asarray(s.tokens).ndim != 4 for s in scans):
        raise VoxelFMError(f"conv_decoder: {what} tokens must be (gx, gy, gz, D) of one width")
    if need_labels and any(s.labels is None for s in scans):
        raise VoxelFMError(f"conv_decoder: a {what} scan has no label map")
    return dims.pop()


def fit_select_conv_decoder(
    train: Sequence[SegmentationScan],
    val: Sequence[SegmentationScan],
    n_classes: int,
    patch_size: int,
    *,
    epochs: int = 30,
    steps_per_epoch: int | None = None,
    crop_tokens: int = 8,
    batch_size: int = 2,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    width: int = 64,
    foreground_fraction: float = 0.5,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    device: str = "cpu",
    seed: int = 0,
) -> FittedSegmenter:
    """Train the decoder on random crops of the train scans; keep the epoch with the best
    mean macro Dice on val (whole val scans, sliding window).

    Args:
        train, val: scans with label maps of class indices in [0, n_classes).
        n_classes: classes including background.
        patch_size: voxels per token along each axis.
        steps_per_epoch: optimiser steps per epoch (default: enough batches for one crop
            per training scan).
        seed: seeds initialisation and crop sampling (the global torch RNG is untouched).
    """
    from monai.losses import DiceCELoss

    token_dim = _check_scans(train, "train", True)
    if _check_scans(val, "val", True) != token_dim:
        raise VoxelFMError("conv_decoder: train and val tokens have different widths")
    if crop_tokens < 1 or epochs < 1 or batch_size < 1:
        raise VoxelFMError("conv_decoder: crop_tokens, epochs and batch_size must be >= 1")
    steps = steps_per_epoch or max(1, math.ceil(len(train) / batch_size))
    sampler = _CropSampler(
        train, patch_size, crop_tokens, foreground_fraction, np.random.default_rng(seed)
    )
    val_truth = [np.asarray(s.labels) for s in val]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = ConvDecoder(token_dim, n_classes, patch_size, width).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    best_score, best_epoch, best_state = -np.inf, 0, copy.deepcopy(network.state_dict())
    trace = []
    for epoch in range(1, epochs + 1):
        network.train()
        losses = []
        for _ in range(steps):
            tokens, labels = sampler.batch(batch_size)
            optimizer.zero_grad()
            loss = loss_fn(network(tokens.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        scores = []
        for scan, truth in zip(val, val_truth):
            logits = predict_logits(
                network, scan.tokens, crop_tokens, sw_batch_size, overlap, device
            )
            prediction = logits.argmax(0).numpy()[tuple(slice(0, n) for n in truth.shape)]
            scores.append(dice_macro(confusion_counts(truth, prediction, n_classes)))
        score = float(nanmean(np.asarray(scores, dtype=float)))
        trace.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_dice": score})
        if np.isfinite(score) and score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(network.state_dict())
    if best_epoch == 0:
        raise VoxelFMError("conv_decoder: no epoch gave a finite validation Dice")
    network.load_state_dict(best_state)
    network.eval()
    return FittedSegmenter(
        network=network,
        n_classes=n_classes,
        crop_tokens=crop_tokens,
        hyperparameters={
            "epochs": best_epoch,
            "max_epochs": epochs,
            "steps_per_epoch": steps,
            "crop_tokens": crop_tokens,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "width": width,
            "foreground_fraction": foreground_fraction,
        },
        validation_score=best_score,
        selection_trace=trace,
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        device=device,
    )
