"""Training metrics: collapse signals, a CSV + TensorBoard log, and the run's plots."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from voxelfm.train.settings import SSLSettings

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


# Within this fraction of log K a distribution is treated as uniform.
UNIFORM_FRACTION = 0.98
# Logged points in a row before a stalled student is reported (a healthy run's falling loss
# can cross log K once on its way down).
STALL_POINTS = 3
STALL_TOLERANCE = 0.01  # |loss_dino - log K| / log K


def head_warnings(settings: SSLSettings) -> list[str]:
    """Recipe problems visible before training: one message per head that has fewer
    prototypes than bottleneck dimensions.

    Such prototypes span only part of the normalised bottleneck, so the student can score 0
    against every prototype at once, predict the uniform distribution and sit at a DINO loss
    of exactly log K without learning anything (seen on the demo cohort with K = 16 or 32
    and a 64-wide bottleneck).
    """
    messages = []
    for name, head in (("dino", settings.dino), ("ibot", settings.ibot)):
        if head.head_n_prototypes < head.head_bottleneck_dim:
            messages.append(
                f"{name}.head_n_prototypes ({head.head_n_prototypes}) is below "
                f"{name}.head_bottleneck_dim ({head.head_bottleneck_dim}): the student can "
                "predict uniform targets and stop learning; use at least as many prototypes "
                "as bottleneck dimensions"
            )
    return messages


class TrainingHealth:
    """Reports, once each, the two ways a self-distillation run stops learning.

    * teacher collapse: the teacher's targets are nearly uniform (entropy near log K);
    * stalled student: the teacher is sharp but the student predicts the uniform
      distribution, so the DINO loss sits at log K (cross-entropy of any target against a
      uniform prediction) for several logged points in a row.
    Call :meth:`check` with every logged metrics row; it returns the new warnings.
    """

    def __init__(self, n_prototypes: int):
        self.log_k = math.log(n_prototypes)
        self.reported: set[str] = set()
        self._stalled_points = 0

    def check(self, iteration: int, metrics: Mapping[str, float]) -> list[str]:
        found = []
        entropy = metrics.get("teacher_entropy", float("nan"))
        if entropy >= UNIFORM_FRACTION * self.log_k:
            message = (
                f"iteration {iteration}: teacher entropy {entropy:.2f} of at most "
                f"{self.log_k:.2f} nats: the teacher's targets are nearly uniform, i.e. the "
                "run is collapsing (try a lower lr or teacher temperature, a faster teacher "
                "EMA or Sinkhorn-Knopp; see config/config.yaml)"
            )
            found.append(("teacher_collapse", message))
        loss = metrics.get("loss_dino", float("nan"))
        sharp_teacher = entropy < UNIFORM_FRACTION * self.log_k
        if sharp_teacher and abs(loss - self.log_k) <= STALL_TOLERANCE * self.log_k:
            self._stalled_points += 1
        else:
            self._stalled_points = 0
        if self._stalled_points >= STALL_POINTS:
            message = (
                f"iteration {iteration}: DINO loss {loss:.3f} = log K ({self.log_k:.3f}) for "
                f"{self._stalled_points} logged points while the teacher is sharp (entropy "
                f"{entropy:.2f}): the student predicts uniform targets and is not learning "
                "(try a lower teacher temperature, larger global crops or more prototypes)"
            )
            found.append(("student_stalled", message))
        new = [message for kind, message in found if kind not in self.reported]
        self.reported.update(kind for kind, _ in found)
        return new


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

        self._writer = SummaryWriter(
            log_dir=str(Path(folder) / "tensorboard"), purge_step=start_iteration + 1
        )

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
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    fig.suptitle("VoxelFM pretraining", fontsize=12)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(out_png)
