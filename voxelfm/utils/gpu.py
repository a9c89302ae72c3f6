"""Does a job that was given GPUs have CUDA? Fail at once if not, unless CPU fallback is allowed.

A SLURM job submitted with GPUs (``SLURM_GPUS_ON_NODE``), or ``voxelfm pretrain --gpus N``,
that finds no CUDA (a CPU-only torch build, a missing driver) would otherwise run for hours
on the node's CPUs. It stops with one line instead, unless ``VOXELFM_ALLOW_CPU_FALLBACK=1``
is set (tests, and clusters whose "GPU" partition is a CPU test bed): then it warns and runs
exactly as a CPU job would.
"""

from __future__ import annotations

import os
import sys

from voxelfm.errors import VoxelFMError

CPU_FALLBACK_ENV = "VOXELFM_ALLOW_CPU_FALLBACK"


def allocated_gpus(requested: int = 0) -> int:
    """GPUs this process was asked to use: ``requested`` or what SLURM gave the job."""
    on_node = os.environ.get("SLURM_GPUS_ON_NODE", "").strip()
    job_gpus = os.environ.get("SLURM_JOB_GPUS", "").strip()
    slurm = int(on_node) if on_node.isdigit() else len([g for g in job_gpus.split(",") if g])
    return max(int(requested), slurm)


def cpu_fallback_allowed() -> bool:
    return os.environ.get(CPU_FALLBACK_ENV, "").strip().lower() in ("1", "true", "yes")


def use_allocated_gpus(command: str, requested: int = 0) -> bool:
    """True when GPUs were asked for and CUDA is there; False when none were asked for, or
    when they were but CUDA is missing and CPU fallback is allowed (a warning says so).

    Raises:
        VoxelFMError: GPUs were asked for, CUDA is missing and fallback is not allowed.
    """
    wanted = allocated_gpus(requested)
    if wanted == 0:
        return False
    import torch

    if torch.cuda.is_available():
        return True
    where = (
        f"SLURM gave this job {wanted} GPU(s) (SLURM_GPUS_ON_NODE)"
        if wanted > requested
        else f"{wanted} GPU(s) requested"
    )
    build = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}"
    if not cpu_fallback_allowed():
        raise VoxelFMError(
            f"{where} but CUDA is not available ({build}); install a CUDA build of torch "
            f"(README, GPU install) or set {CPU_FALLBACK_ENV}=1 to run on CPU"
        )
    print(
        f"voxelfm {command}: warning: {where} but CUDA is not available ({build}); "
        f"running on CPU because {CPU_FALLBACK_ENV}=1",
        file=sys.stderr,
        flush=True,
    )
    return False
