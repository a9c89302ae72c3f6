"""Teacher targets over two CPU ranks (gloo) equal those of one process on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from voxelfm.ssl.sinkhorn import sinkhorn_knopp
from voxelfm.ssl.teacher_targets import TeacherTargets

WORLD_SIZE = 2


def _global_batch() -> torch.Tensor:
    # Uneven split on purpose: masked-patch counts differ between ranks.
    return torch.randn(7, 5, generator=torch.Generator().manual_seed(3))


def _rank_rows(rank: int) -> slice:
    return slice(0, 3) if rank == 0 else slice(3, 7)


def _worker(rank: int, init_file: str) -> None:
    logits = _global_batch()
    rows = _rank_rows(rank)
    # References computed before the process group exists, i.e. single-process.
    sinkhorn_reference = sinkhorn_knopp(logits, temperature=0.2)[rows]
    centre_reference = logits.mean(dim=0, keepdim=True)

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        torch.testing.assert_close(
            sinkhorn_knopp(logits[rows], temperature=0.2), sinkhorn_reference
        )

        targets = TeacherTargets(5, "centring")
        targets(logits[rows], 0.1)
        targets.update_centre()
        torch.testing.assert_close(targets.centre, centre_reference)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch: ~6 s on 2 cores
def test_teacher_targets_reduce_over_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD_SIZE, join=True)
