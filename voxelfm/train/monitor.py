"""Training metrics: collapse signals, a CSV + TensorBoard log, and the run's plots."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

METRICS_FILE = "metrics.csv"


@torch.no_grad()
def teacher_entropy(teacher_probs: Tensor) -> float:
    """Mean entropy (nats) of the teacher's prototype distributions, (..., K) -> float.

    Near 0: the teacher is one-hot (sharp, or collapsed onto one prototype per sample);
    near log K: uniform (collapsed to the uniform distribution).
    """
    probs = teacher_probs.float().reshape(-1, teacher_probs.shape[-1])
    return float(-(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean())


@torch.no_grad()
def embedding_collapse_stats(embeddings: Tensor) -> dict[str, float]:
    """Collapse signals of a batch of embeddings (N, D).

    ``cls_std``: mean over dimensions of the per-dimension std of the L2-normalised
    embeddings; about 1/sqrt(D) for well-spread features, 0 when every sample maps to the
    same point. ``cls_effective_rank``: exp(entropy of the normalised singular values)
    (Roy & Vetterli, 2007), between 1 (collapse onto a line) and min(N, D).
    """
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    stats = {"cls_std": float(unit.std(dim=0).mean())}
    singular = torch.linalg.svdvals(unit - unit.mean(dim=0, keepdim=True))
    weights = singular / singular.sum().clamp_min(1e-12)
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum()
    stats["cls_effective_rank"] = float(entropy.exp())
    return stats


class MetricsLog:
    """Append-only CSV of per-iteration metrics, mirrored to TensorBoard.

    Row k describes the k-th completed step, which checkpoint k contains. On resume from
    checkpoint k the CSV keeps rows up to k, so a run interrupted after logging but before
    checkpointing does not log the same iterations twice.
    """

    def __init__(self, folder: Path, start_iteration: int, enabled: bool = True):
        self.path = Path(folder) / METRICS_FILE
        self.enabled = enabled
        self._fields: list[str] | None = None
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with open(self.path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["iteration"]) <= start_iteration]
            if rows:
                self._fields = list(rows[0])
            with open(self.path, "w", newline="") as handle:
                if self._fields:
                    writer = csv.DictWriter(handle, fieldnames=self._fields)
                    writer.writeheader()
                    writer.writerows(rows)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(Path(folder) / "tensorboard"), purge_step=start_iteration + 1)

    def log(self, iteration: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"iteration": iteration, **values}
        new_file = self._fields is None
        if new_file:
            self._fields = list(row)
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(name, value, iteration)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def plot_metrics(metrics_csv: Path, out_png: Path) -> Path:
    """One PNG with a panel per metric (losses, schedules, collapse signals) over iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from voxelfm.utils.atomic import atomic_path

    frame = pd.read_csv(metrics_csv)
    columns = [c for c in frame.columns if c != "iteration"]
    n_cols = 3
    n_rows = max(1, math.ceil(len(columns) / n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 2.8 * n_rows), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        ax.plot(frame["iteration"], frame[column], lw=1.2)
        ax.set_title(column, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
        if column in ("lr", "loss_total", "loss_dino", "loss_ibot") and (frame[column] > 0).all():
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.suptitle("VoxelFM pretraining", fontsize=12)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(out_png)
