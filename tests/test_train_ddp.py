"""Two CPU processes (gloo DDP) train exactly like one process on the same global batch.

Each spawned rank joins through :func:`voxelfm.train.trainer.init_distributed` (torchrun's
environment variables), trains the tiny model for 2 steps on its half of every micro-batch
and writes its state; the parent trains the same config in a single process and compares.
KoLeo is on: the model gathers its features across ranks, so it sees the whole batch.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
STEPS = 2
GLOBAL, LOCAL, N_LOCAL = 32, 16, 2
N_TOKENS = (GLOBAL // 8) ** 3  # tiny preset: patch 8
SAMPLES_PER_MICRO = 4  # global micro-batch; each rank gets 2
TIMEOUT_S = 240

TINY: dict[str, Any] = {
    "model": {"preset": "tiny", "drop_path_rate": 0.0},
    "dino": {
        "head_n_prototypes": 256,
        "head_hidden_dim": 128,
        "head_bottleneck_dim": 64,
        "koleo_loss_weight": 0.1,
    },
    "ibot": {"head_n_prototypes": 256, "head_hidden_dim": 128, "head_bottleneck_dim": 64},
    "crops": {
        "global_crops_size": GLOBAL,
        "local_crops_size": LOCAL,
        "local_crops_number": N_LOCAL,
    },
    "train": {
        "epochs": 1,
        "official_epoch_length": STEPS,
        "compute_precision": "fp32",
        "num_workers": 0,
        "seed": 0,
    },
    "schedules": {
        "lr": {"warmup_epochs": 0, "freeze_last_layer_epochs": 0},
        "teacher_temp": {"warmup_epochs": 0},
        "momentum": {"start": 0.9, "end": 0.9},  # a teacher that visibly moves
    },
    "checkpointing": {"period_iterations": 1, "max_to_keep": 2},
    "monitoring": {"log_period_iterations": 1},
}

# name -> (total_batch_size, batch_size_per_gpu on each of 2 ranks, on 1 process)
CASES = {"accum1": (4, 2, 4), "accum2": (8, 2, 4)}


def _deep_update(base: dict, overrides: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _cfg(total: int, per_gpu: int) -> dict[str, Any]:
    from voxelfm.train.config import resolve_ssl_config

    return resolve_ssl_config(
        _deep_update(TINY, {"train": {"total_batch_size": total, "batch_size_per_gpu": per_gpu}})
    )


def make_sample(index: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(20_000 + index)
    return {
        "global": torch.randn(2, 1, GLOBAL, GLOBAL, GLOBAL, generator=gen),
        "local": torch.randn(N_LOCAL, 1, LOCAL, LOCAL, LOCAL, generator=gen),
        "masks": torch.rand(2, N_TOKENS, generator=gen) < 0.3,
    }


def make_batch(indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """View-major: global_crops = cat(view 0 of the samples, view 1 of the samples)."""
    samples = [make_sample(i) for i in indices]
    return {
        "global_crops": torch.cat([s["global"][v : v + 1] for v in range(2) for s in samples]),
        "local_crops": torch.cat([s["local"][v : v + 1] for v in range(N_LOCAL) for s in samples]),
        "masks": torch.cat([s["masks"][v : v + 1] for v in range(2) for s in samples]),
    }


def micro_batches(rank: int, world_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Global micro-batch k holds samples [4k, 4k + 4); rank r of W takes its r-th share."""
    share = SAMPLES_PER_MICRO // world_size
    k = 0
    while True:
        first = k * SAMPLES_PER_MICRO + rank * share
        yield make_batch(range(first, first + share))
        k += 1


def _state(trainer) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "grads": {
            n: p.grad.clone()
            for n, p in trainer.model.student.named_parameters()
            if p.grad is not None
        },
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD_SIZE),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    if "GLOO_SOCKET_IFNAME" not in os.environ and Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only, whatever the hostname says
    torch.set_num_threads(1)
    from voxelfm.train.trainer import Pretrainer, init_distributed

    ctx = init_distributed()
    try:
        assert (ctx.rank, ctx.world_size) == (rank, WORLD_SIZE)
        for name, (total, per_gpu, _) in CASES.items():
            trainer = Pretrainer(
                _cfg(total, per_gpu), Path(out_dir) / f"work_{name}", ctx, progress=False
            )
            assert trainer.accum == total // (per_gpu * WORLD_SIZE)
            assert trainer.run(micro_batches(rank, WORLD_SIZE)) == STEPS
            torch.save(_state(trainer), Path(out_dir) / f"{name}_rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    out_dir = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(
        _worker,
        args=(_free_port(), str(out_dir)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"2-process gloo training did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:  # only the workers spawned above
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
                process.join(5)

    # Single-process reference on the same global micro-batches (no process group here).
    from voxelfm.train.trainer import DistributedContext, Pretrainer

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = DistributedContext(rank=0, world_size=1, device=torch.device("cpu"))
        results = {}
        for name, (total, _, per_gpu) in CASES.items():
            trainer = Pretrainer(
                _cfg(total, per_gpu), out_dir / f"single_{name}", single, progress=False
            )
            assert trainer.run(micro_batches(0, 1)) == STEPS
            ranks = [
                torch.load(out_dir / f"{name}_rank{r}.pt", weights_only=True)
                for r in range(WORLD_SIZE)
            ]
            results[name] = {
                "single": _state(trainer),
                "ranks": ranks,
                "init": Pretrainer(
                    _cfg(total, per_gpu), out_dir / f"init_{name}", single, progress=False
                ).model.state_dict(),
            }
    finally:
        torch.set_num_threads(threads)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return results


@pytest.mark.slow  # two spawned interpreters importing torch, plus 2 x 2 tiny training runs
@pytest.mark.parametrize("case", list(CASES))
def test_two_process_ddp_equals_one_process(ddp_results, case):
    result = ddp_results[case]
    single, rank0, rank1 = result["single"], *result["ranks"]
    model = single["model"]
    assert model.keys() == rank0["model"].keys()
    # Replicas stay in lockstep: identical weights and centres on both ranks.
    out_of_sync = [k for k in model if not torch.equal(rank0["model"][k], rank1["model"][k])]
    assert not out_of_sync, f"ranks disagree after {STEPS} steps: {out_of_sync[:6]}"

    centre_keys = [k for k in model if k.endswith("centre")]
    assert len(centre_keys) == 2, centre_keys
    student_teacher = [k for k in model if k.startswith(("student.", "teacher."))]
    moved = [k for k in student_teacher if not torch.equal(model[k], result["init"][k])]
    assert len(moved) > len(student_teacher) // 2, "training barely moved the weights"
    for key in student_teacher + centre_keys:
        torch.testing.assert_close(
            rank0["model"][key],
            model[key],
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, k=key: f"{case}: {k} differs between 2-rank DDP and 1 process: {m}",
        )

    # The gradients of the last step, averaged by DDP, equal the single-process ones (KoLeo
    # included: its gathered features give each rank the gradient of the global batch).
    grads = single["grads"]
    assert grads.keys() == rank0["grads"].keys() and grads
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(
            rank0["grads"][name],
            grad,
            rtol=1e-4,
            atol=1e-5 * scale,
            msg=lambda m, n=name: f"{case}: gradient of {n} differs under DDP: {m}",
        )
