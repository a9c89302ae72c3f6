"""Start a pretraining run: resolve the config, pick the work folder, spawn processes, publish.

``launch_pretraining`` is what ``voxelfm pretrain`` (and so the Snakemake rule) calls. It
trains in ``<work_dir>/<config hash>/`` (checkpoints there survive a killed job and are
resumed by a rerun with the same config) and, once training is complete, atomically
publishes the run folder: resolved config, final checkpoint, metrics and plots.

With more than one GPU it re-executes itself under torchrun, one process per GPU; each
process runs :func:`train_worker`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from voxelfm.errors import VoxelFMError
from voxelfm.train.config import config_hash, resolve_ssl_config
from voxelfm.utils.atomic import atomic_directory, atomic_write_text

RESOLVED_CONFIG = "config.yaml"
FINAL_CHECKPOINT = "final_checkpoint.pt"
STORES_FILE = "stores.json"
PLOT_FILE = "pretraining.png"


def micro_batches(
    cfg: Mapping[str, Any], stores: Sequence[str], rank: int, world_size: int, start_micro_batch: int
) -> Iterator[dict]:
    """The infinite stream of collated micro-batches of this rank, from ``start_micro_batch``."""
    from voxelfm.models.vision_transformer import VIT_PRESETS
    from voxelfm.ssl.data import IBOTMaskingConfig, build_ssl_dataloader
    from voxelfm.ssl.multicrop import MultiCropConfig
    from voxelfm.store import VolumeStore

    patch_size = cfg["model"]["overrides"].get(
        "patch_size", VIT_PRESETS[cfg["model"]["preset"]]["patch_size"]
    )
    loader = build_ssl_dataloader(
        VolumeStore([Path(s) for s in stores]),
        MultiCropConfig.from_recipe(cfg["crops"]),
        batch_size_per_rank=cfg["train"]["batch_size_per_gpu"],
        num_workers=cfg["train"]["num_workers"],
        base_seed=cfg["train"]["seed"],
        patch_size=patch_size,
        masking=IBOTMaskingConfig.from_recipe(cfg["ibot"]),
        start_iteration=start_micro_batch,
        rank=rank,
        world_size=world_size,
    )
    return iter(loader)


def train_worker(work_dir: Path, threads: int, progress: bool = True) -> None:
    """One training process: reads the resolved config and store list from ``work_dir``."""
    import torch

    from voxelfm.train.trainer import Pretrainer, init_distributed

    torch.set_num_threads(max(1, threads))
    cfg = yaml.safe_load((work_dir / RESOLVED_CONFIG).read_text())
    stores = json.loads((work_dir / STORES_FILE).read_text())
    ctx = init_distributed()
    trainer = Pretrainer(cfg, work_dir, ctx, progress=progress)
    batches = micro_batches(
        cfg, stores, ctx.rank, ctx.world_size, trainer.start_iteration * trainer.accum
    )
    reached = trainer.run(batches)
    if reached < trainer.total_iterations:
        raise VoxelFMError(
            f"training stopped at iteration {reached} of {trainer.total_iterations} "
            f"(pre-empted?); rerun the same command to resume from {work_dir}"
        )
    if ctx.is_main:
        from voxelfm.train.monitor import METRICS_FILE, plot_metrics

        plot_metrics(work_dir / METRICS_FILE, work_dir / PLOT_FILE)


def launch_pretraining(
    *,
    stores: Sequence[str],
    out_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    gpus: int = 0,
    threads: int = 2,
) -> Path:
    """Train (or resume) and publish ``out_dir``; returns it."""
    cfg = resolve_ssl_config(overrides)
    missing = [s for s in stores if not Path(s).is_dir()]
    if missing:
        raise VoxelFMError(f"Zarr store(s) not found: {', '.join(missing)}")
    run_dir = Path(work_dir) / config_hash({"ssl": cfg, "stores": sorted(map(str, stores))})
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RESOLVED_CONFIG, yaml.safe_dump(cfg, sort_keys=False))
    atomic_write_text(run_dir / STORES_FILE, json.dumps([str(s) for s in stores], indent=1))
    print(f"pretraining in {run_dir}", flush=True)

    if gpus > 1:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={gpus}", "-m", "voxelfm.train.launch",
            "--work-dir", str(run_dir), "--threads", str(threads),
        ]
        if subprocess.run(command, check=False).returncode != 0:
            raise VoxelFMError(f"distributed training failed; see the log; state kept in {run_dir}")
    else:
        train_worker(run_dir, threads)
    return publish_run(run_dir, Path(out_dir))


def publish_run(run_dir: Path, out_dir: Path) -> Path:
    """Copy the finished run's config, metrics and plots, and link its final checkpoint."""
    import shutil

    from voxelfm.train.checkpoint import list_checkpoints
    from voxelfm.train.monitor import METRICS_FILE
    from voxelfm.train.trainer import CHECKPOINT_DIR

    checkpoints = list_checkpoints(run_dir / CHECKPOINT_DIR)
    if not checkpoints:
        raise VoxelFMError(f"{run_dir}: no checkpoint to publish")
    with atomic_directory(out_dir) as tmp:
        for name in (RESOLVED_CONFIG, STORES_FILE, METRICS_FILE, PLOT_FILE):
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, tmp / name)
        final = checkpoints[-1][1]
        try:  # a hard link costs nothing and keeps the work folder's copy for resumes
            os.link(final, tmp / FINAL_CHECKPOINT)
        except OSError:
            shutil.copy2(final, tmp / FINAL_CHECKPOINT)
    return out_dir


def _worker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one torchrun training process")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        rank = int(os.environ.get("RANK", "0"))
        train_worker(Path(args.work_dir), args.threads, progress=rank == 0)
    except VoxelFMError as err:
        print(f"voxelfm pretrain: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
