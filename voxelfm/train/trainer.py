"""The self-distillation training loop: schedules, accumulation, DDP, EMA, checkpoints.

Exact resume: the data order and crops are pure functions of (seed, epoch, sample index),
the schedules are pure functions of the iteration, and the checkpoint carries model,
optimiser and RNG state; a run killed after iteration k and resumed produces the same
weights as one that never stopped (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from voxelfm.errors import VoxelFMError
from voxelfm.models.vision_transformer import layer_id_for_param
from voxelfm.ssl.ema import update_teacher_
from voxelfm.ssl.param_groups import apply_schedule, build_param_groups
from voxelfm.ssl.schedules import SSLSchedules, WarmupCosineSchedule, sqrt_batch_scaled_lr
from voxelfm.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from voxelfm.train.monitor import (
    MetricsLog,
    TrainingHealth,
    embedding_collapse_stats,
    head_warnings,
    teacher_entropy,
)
from voxelfm.train.settings import SSLSettings, TrainSettings
from voxelfm.train.ssl_model import SelfDistillationModel

CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistributedContext:
    """Join the process group torchrun set up (nccl on GPU, gloo on CPU), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistributedContext(rank=rank, world_size=world_size, device=device)


def build_schedules(settings: SSLSettings) -> SSLSchedules:
    """The four schedules of a recipe, in iterations (optimiser steps)."""
    epochs = settings.train.epochs
    per_epoch = settings.train.official_epoch_length

    def cosine(start: float, peak: float, end: float, warmup_epochs: float) -> WarmupCosineSchedule:
        return WarmupCosineSchedule.from_epochs(start, peak, end, warmup_epochs, epochs, per_epoch)

    lr = settings.schedules.lr
    peak_lr = lr.peak
    if settings.optim.scaling_rule == "sqrt_wrt_1024":
        peak_lr = sqrt_batch_scaled_lr(peak_lr, settings.train.total_batch_size)
    weight_decay = settings.schedules.weight_decay
    momentum = settings.schedules.momentum
    temp = settings.schedules.teacher_temp
    return SSLSchedules(
        lr=cosine(lr.start, peak_lr, lr.end, lr.warmup_epochs),
        weight_decay=cosine(weight_decay.start, weight_decay.start, weight_decay.end, 0),
        teacher_momentum=cosine(momentum.start, momentum.start, momentum.end, 0),
        # Warm up to the peak, then hold it: the cosine runs from peak to peak.
        teacher_temp=cosine(temp.start, temp.peak, temp.peak, temp.warmup_epochs),
        freeze_last_layer_iters=int(lr.freeze_last_layer_epochs * per_epoch),
    )


def accumulation_steps(train: TrainSettings, world_size: int) -> int:
    """Micro-batches per optimiser step so that the effective batch is total_batch_size."""
    per_step = train.batch_size_per_gpu * world_size
    total = train.total_batch_size
    if total % per_step:
        raise VoxelFMError(
            f"train.total_batch_size ({total}) must be a multiple of batch_size_per_gpu x "
            f"processes ({per_step})"
        )
    return total // per_step


class _StopRequested:
    """Set by SIGTERM/SIGUSR1 (SLURM pre-emption): checkpoint at the next step and exit.

    The previous handlers come back on :meth:`restore`.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.flag = False
        self._previous: dict[int, Any] = {}
        for sig in self._SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, *_: Any) -> None:
        self.flag = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Pretrainer:
    """Owns the model, optimiser and schedules of one run; :meth:`run` trains to the end.

    ``config`` is the resolved SSL config (``resolve_ssl_config``); it is validated into
    :attr:`settings` and saved as it is in every checkpoint.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        work_dir: Path,
        ctx: DistributedContext,
        *,
        progress: bool = True,
    ):
        self.config = config
        self.settings = settings = SSLSettings.from_config(config)
        self.work_dir = Path(work_dir)
        self.ctx = ctx
        self.progress = progress and ctx.is_main
        self.accum = accumulation_steps(settings.train, ctx.world_size)
        self.total_iterations = settings.train.total_iterations
        self.schedules = build_schedules(settings)

        torch.manual_seed(settings.train.seed)  # same initial weights on every rank
        self.model = SelfDistillationModel(settings).to(ctx.device)
        student = self.model.student
        groups = build_param_groups(
            dict(student.items()),
            num_layers=len(student["backbone"].blocks),
            layer_decay=settings.optim.layerwise_decay,
            patch_embed_lr_mult=settings.optim.patch_embed_lr_mult,
            layer_id_fn=layer_id_for_param,
        )
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=0.0,  # set every iteration by the schedule
            betas=(settings.optim.adamw_beta1, settings.optim.adamw_beta2),
        )
        self.start_iteration = self._resume()
        if settings.train.compile:
            # Module.compile keeps parameter names, so the EMA update and checkpoints see the
            # same state dict as an eager run.
            for network in (self.model.student, self.model.teacher):
                network["backbone"].compile()
        # Distinct but reproducible stochastic depth on each rank.
        if self.start_iteration == 0:
            torch.manual_seed(settings.train.seed + 1000 * ctx.rank)
        self.model.train()
        self.forward_model: nn.Module = self.model
        if ctx.world_size > 1:
            # Buffers are not broadcast: the loss centres hold rank-local pending sums that
            # are all-reduced explicitly once per step.
            self.forward_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                broadcast_buffers=False,
            )

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / CHECKPOINT_DIR

    def _resume(self) -> int:
        checkpoints = list_checkpoints(self.checkpoint_dir)
        if not checkpoints:
            return 0
        iteration, path = checkpoints[-1]
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"][min(self.ctx.rank, len(state["rng"]) - 1)])
        if self.ctx.is_main:
            print(f"resumed from {path} (iteration {iteration})", flush=True)
        return iteration

    def _save(self, iteration: int) -> None:
        # Every rank's RNG (stochastic depth differs per rank) goes into rank 0's file.
        states = [rng_state()]
        if self.ctx.world_size > 1:
            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, states[0])
            states = gathered
        if self.ctx.is_main:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "iteration": iteration,
                "rng": states,
                "config": dict(self.config),
            }
            save_checkpoint(
                self.checkpoint_dir, iteration, state, self.settings.checkpointing.max_to_keep
            )
        if self.ctx.world_size > 1:
            dist.barrier()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.settings.train.compute_precision == "bf16":
            return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(
        self,
        micro_batches: list[Mapping[str, torch.Tensor]],
        iteration: int,
        with_stats: bool = True,
    ) -> dict[str, float]:
        """One optimiser step over ``accum`` micro-batches; returns the step's metrics.

        ``with_stats`` adds the teacher entropy and collapse signals (an SVD per call).
        """
        values = self.schedules.at(iteration)
        apply_schedule(self.optimizer, values)
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss_total": 0.0, "loss_dino": 0.0, "loss_ibot": 0.0, "loss_koleo": 0.0}
        outputs = None
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext()
            if not last and isinstance(self.forward_model, nn.parallel.DistributedDataParallel):
                sync = self.forward_model.no_sync()
            with sync:
                with self._autocast():
                    outputs = self.forward_model(
                        batch["global_crops"].to(self.ctx.device, non_blocking=True),
                        batch["local_crops"].to(self.ctx.device, non_blocking=True),
                        batch["masks"].to(self.ctx.device, non_blocking=True),
                        values.teacher_temp,
                    )
                (outputs.total / len(micro_batches)).backward()
            sums["loss_total"] += float(outputs.total.detach()) / len(micro_batches)
            sums["loss_dino"] += float(outputs.dino) / len(micro_batches)
            sums["loss_ibot"] += float(outputs.ibot) / len(micro_batches)
            sums["loss_koleo"] += float(outputs.koleo) / len(micro_batches)

        if not math.isfinite(sums["loss_total"]):
            raise VoxelFMError(
                f"training diverged at iteration {iteration + 1}: loss is not finite"
            )
        grad_norms = []
        clip = self.settings.optim.clip_grad
        for module in self.model.student.values():  # per submodule, as dinov2 clips
            params = [p for p in module.parameters() if p.grad is not None]
            if params and clip:
                grad_norms.append(float(nn.utils.clip_grad_norm_(params, clip)))
        self.optimizer.step()
        update_teacher_(self.model.teacher, self.model.student, values.teacher_momentum)
        self.model.update_centres()

        metrics = dict(sums)
        metrics.update(
            lr=values.lr,
            weight_decay=values.weight_decay,
            teacher_momentum=values.teacher_momentum,
            teacher_temp=values.teacher_temp,
            grad_norm_backbone=grad_norms[0] if grad_norms else float("nan"),
        )
        if with_stats:
            metrics["teacher_entropy"] = teacher_entropy(outputs.teacher_probs)
            metrics.update(embedding_collapse_stats(outputs.teacher_cls))
        return metrics

    def run(
        self, micro_batches: Iterator[Mapping[str, torch.Tensor]], stop_at: int | None = None
    ) -> int:
        """Train from the resumed iteration to the end (or to ``stop_at``); returns the
        iteration reached. ``micro_batches`` must start at micro-batch
        ``start_iteration * accum`` of the data order."""
        end = self.total_iterations if stop_at is None else min(stop_at, self.total_iterations)
        log = MetricsLog(self.work_dir, self.start_iteration, enabled=self.ctx.is_main)
        stop = _StopRequested()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=end,
                initial=self.start_iteration,
                desc="pretrain",
                unit="it",
                dynamic_ncols=True,
                mininterval=2.0,
            )
        period = self.settings.checkpointing.period_iterations
        log_period = self.settings.monitoring.log_period_iterations
        samples_per_step = self.settings.train.total_batch_size
        iteration = self.start_iteration
        tick = time.perf_counter()
        health = TrainingHealth(self.settings.dino.head_n_prototypes)
        if self.ctx.is_main:
            for message in head_warnings(self.settings):
                print(f"warning: {message}", file=sys.stderr, flush=True)
        try:
            while iteration < end:
                batches = [next(micro_batches) for _ in range(self.accum)]
                logging_now = (iteration + 1) % log_period == 0 or iteration + 1 == end
                metrics = self.train_step(batches, iteration, with_stats=logging_now)
                iteration += 1
                if logging_now:
                    elapsed = time.perf_counter() - tick
                    metrics["samples_per_s"] = samples_per_step * log_period / max(elapsed, 1e-9)
                    tick = time.perf_counter()
                    log.log(iteration, metrics)
                    if self.ctx.is_main:
                        for message in health.check(iteration, metrics):
                            print(f"warning: {message}", file=sys.stderr, flush=True)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss_total']:.3f}", lr=f"{metrics['lr']:.2e}")
                if iteration % period == 0 or iteration == end or stop.flag:
                    self._save(iteration)
                if stop.flag:
                    break
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
            log.close()
        return iteration
