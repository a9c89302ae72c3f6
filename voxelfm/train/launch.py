"""Start a pretraining run: resolve the config, pick the work folder, spawn processes, publish.

``launch_pretraining`` is what ``voxelfm pretrain`` (and so the Snakemake rule) calls. It
trains in ``<work_dir>/<run key>/`` (checkpoints there survive a killed job and are resumed
by a rerun) and, once training is complete, atomically publishes the run folder: resolved
config, final checkpoint, metrics and plots. The run key (:func:`run_key`) covers the
stores' content fingerprints, the resolved recipe and the code version, so a rerun never
resumes (or republishes) a run made from other data, settings or code.

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
from typing import TYPE_CHECKING, Any

import yaml

from voxelfm.errors import VoxelFMError
from voxelfm.train.config import config_hash, resolve_ssl_config
from voxelfm.utils.atomic import atomic_directory, atomic_write_text

if TYPE_CHECKING:
    from voxelfm.train.settings import SSLSettings

RESOLVED_CONFIG = "config.yaml"
FINAL_CHECKPOINT = "final_checkpoint.pt"
STORES_FILE = "stores.json"
PLOT_FILE = "pretraining.png"


def micro_batches(
    settings: SSLSettings,
    stores: Sequence[str],
    rank: int,
    world_size: int,
    start_micro_batch: int,
) -> Iterator[dict]:
    """The infinite stream of collated micro-batches of this rank, from ``start_micro_batch``."""
    from voxelfm.ssl.data import build_ssl_dataloader
    from voxelfm.store import VolumeStore

    loader = build_ssl_dataloader(
        VolumeStore([Path(s) for s in stores]),
        settings.crops,
        batch_size_per_rank=settings.train.batch_size_per_gpu,
        num_workers=settings.train.num_workers,
        base_seed=settings.train.seed,
        patch_size=settings.model.patch_size,
        masking=settings.ibot.masking,
        start_iteration=start_micro_batch,
        rank=rank,
        world_size=world_size,
    )
    return _leaving_global_rng_alone(iter(loader))


def _leaving_global_rng_alone(batches: Iterator[dict]) -> Iterator[dict]:
    """``batches``, with torch's global generator left as each ``next`` found it.

    A DataLoader draws its workers' base seed from the global generator when its iterator
    starts (at the first ``next``). A resumed run starts it right after restoring the
    checkpoint's RNG state, the uninterrupted run long before; stochastic depth, which draws
    from the same generator, would run one draw out of step after a resume.
    """
    import torch

    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(batches)
        yield batch


def code_version() -> str:
    """Digest of the package's version and of every source and recipe file that shapes a
    trained model (models, SSL, training loop, store reading, recipe defaults)."""
    import hashlib

    import voxelfm

    package = Path(voxelfm.__file__).parent
    digest = hashlib.sha256(voxelfm.__version__.encode())
    for folder in ("models", "ssl", "train", "store", "configs"):
        for path in sorted((package / folder).rglob("*")):
            if path.suffix in (".py", ".yaml") and path.is_file():
                digest.update(path.relative_to(package).as_posix().encode() + b"\0")
                digest.update(path.read_bytes())
    return digest.hexdigest()


def run_key(config: Mapping[str, Any], stores: Sequence[str]) -> str:
    """Name of a run's work folder: the resolved recipe, the stores' content fingerprints
    (in order: it fixes the data order) and the code version."""
    from voxelfm.ingest.fingerprint import store_fingerprint

    return config_hash(
        {
            "ssl": dict(config),
            "stores": [store_fingerprint(store) for store in stores],
            "code": code_version(),
        }
    )


def train_worker(work_dir: Path, threads: int, progress: bool = True) -> None:
    """One training process: reads the resolved config and store list from ``work_dir``."""
    import torch

    from voxelfm.train.trainer import Pretrainer, init_distributed

    torch.set_num_threads(max(1, threads))
    config = yaml.safe_load((work_dir / RESOLVED_CONFIG).read_text())
    stores = json.loads((work_dir / STORES_FILE).read_text())
    ctx = init_distributed()
    trainer = Pretrainer(config, work_dir, ctx, progress=progress)
    batches = micro_batches(
        trainer.settings, stores, ctx.rank, ctx.world_size, trainer.start_iteration * trainer.accum
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
    nodes: int = 1,
) -> Path:
    """Train (or resume) and publish ``out_dir``; returns it.

    ``gpus`` is per node; ``nodes`` > 1 needs a SLURM allocation of that many nodes and
    starts one torchrun per node through ``srun`` (see :func:`distributed_command`).
    """
    if nodes < 1 or gpus < 0:
        raise VoxelFMError(f"--nodes must be >= 1 and --gpus >= 0, got {nodes} and {gpus}")
    # Deferred like torch in train_worker: the settings import it (through voxelfm.ssl).
    from voxelfm.train.settings import SSLSettings

    config = resolve_ssl_config(overrides)
    SSLSettings.from_config(config)  # a bad value fails here, before any folder is made
    missing = [s for s in stores if not Path(s).is_dir()]
    if missing:
        raise VoxelFMError(f"Zarr store(s) not found: {', '.join(missing)}")
    run_dir = Path(work_dir) / run_key(config, stores)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RESOLVED_CONFIG, yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(run_dir / STORES_FILE, json.dumps([str(s) for s in stores], indent=1))
    print(f"pretraining in {run_dir}", flush=True)

    if gpus > 1 or nodes > 1:
        command = distributed_command(run_dir, threads, gpus=gpus, nodes=nodes)
        print("+", " ".join(command), flush=True)
        if subprocess.run(command, check=False).returncode != 0:
            raise VoxelFMError(f"distributed training failed; see the log; state kept in {run_dir}")
    else:
        train_worker(run_dir, threads)
    return publish_run(run_dir, Path(out_dir))


def torchrun_arguments(
    *, nodes: int, processes_per_node: int, rendezvous: str | None = None, run_id: str = "voxelfm"
) -> list[str]:
    """``python -m torch.distributed.run`` and its options: standalone on one node; with
    ``nodes`` > 1, a c10d rendezvous at ``rendezvous`` (HOST:PORT) that every node's agent
    joins (each node's rank is assigned there)."""
    command = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        return [*command, "--standalone", f"--nproc-per-node={processes_per_node}"]
    if not rendezvous:
        raise VoxelFMError("training on several nodes needs a rendezvous HOST:PORT")
    return [
        *command,
        f"--nnodes={nodes}",
        f"--nproc-per-node={processes_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rendezvous}",
        f"--rdzv-id={run_id}",
    ]


def slurm_rendezvous(env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(HOST:PORT, run id) for a multi-node job: the rendezvous is served on this host (the
    job's batch host, where ``voxelfm pretrain`` runs) at a port derived from the job id, so
    that two jobs sharing a node do not collide."""
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise VoxelFMError(
            "--nodes > 1 runs one torchrun per node through srun and needs a SLURM job "
            "(SLURM_JOB_ID is not set); submit it with the slurm profile's nodes resource"
        )
    import socket

    port = 20000 + int(job_id) % 20000
    return f"{socket.gethostname()}:{port}", f"slurm-{job_id}"


def distributed_command(
    run_dir: Path, threads: int, *, gpus: int, nodes: int, env: Mapping[str, str] = os.environ
) -> list[str]:
    """The command that trains on ``nodes`` x max(gpus, 1) processes.

    One node: ``torchrun --standalone``, one process per GPU. Several: ``srun`` starts one
    torchrun agent per node of the SLURM allocation, which meet at a c10d rendezvous on
    this host (nccl on GPUs, gloo on CPUs: ``init_distributed`` picks).
    """
    per_node = max(gpus, 1)
    worker = ["-m", "voxelfm.train.launch", "--work-dir", str(run_dir), "--threads", str(threads)]
    if nodes == 1:
        return [*torchrun_arguments(nodes=1, processes_per_node=per_node), *worker]
    allocated = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "0"
    rendezvous, run_id = slurm_rendezvous(env)
    if int(allocated) < nodes:
        raise VoxelFMError(
            f"--nodes {nodes} but this SLURM job has {allocated} node(s); request them with "
            "the nodes resource (set-resources: pretrain: nodes: N)"
        )
    srun = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
            "--kill-on-bad-exit=1"]  # fmt: skip
    torchrun = torchrun_arguments(
        nodes=nodes, processes_per_node=per_node, rendezvous=rendezvous, run_id=run_id
    )
    return [*srun, *torchrun, *worker]


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
