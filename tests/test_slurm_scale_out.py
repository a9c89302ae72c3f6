"""Scaling past one machine: embedding scattered per shard, pretraining on several nodes.

* The probes read the union of a dataset's per-shard embedding stores; it must be the store
  one job over every shard writes (same rows in the same order, same features and tokens).
* ``voxelfm pretrain --nodes N`` runs one torchrun agent per node (through srun) meeting at
  a c10d rendezvous. Here two agents on localhost stand in for two nodes (gloo, one process
  each) and train exactly like one process on the same global batch.

Run as a script, this file is the training process those torchrun agents start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
SHAPES = {"s-a": (16, 16, 12), "s-b": (12, 16, 16), "s-c": (16, 12, 16), "s-d": (20, 16, 8)}
TINY_SPEC = {
    "kind": "random_init",
    "preset": "tiny",
    "overrides": {"depth": 1, "layerscale_init": 0.1},
    "seed": 0,
}


def _volume(shape, seed):
    from voxelfm.volume import CanonicalVolume

    rng = np.random.default_rng(seed)
    image = rng.normal(-200, 400, shape).round().clip(-1024, 3071).astype(np.int16)
    return CanonicalVolume(image, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Two shard stores; their per-shard embedding stores and one store of both."""
    from voxelfm.extract.backbones import build_extractor
    from voxelfm.extract.embed import embed_store
    from voxelfm.store import shard_store_name, write_scan

    root = tmp_path_factory.mktemp("scatter")
    shards = [root / shard_store_name(k) for k in range(2)]
    # Interleaved: shard 0 holds s-a and s-c, shard 1 s-b and s-d.
    for seed, (scan_id, shape) in enumerate(SHAPES.items()):
        write_scan(
            shards[seed % 2], scan_id, f"p{seed // 2}", _volume(shape, seed), chunks=(8, 8, 8)
        )
    extractor = build_extractor(TINY_SPEC, "cpu")
    options = {"name": "tiny", "progress": False, "mode": "whole"}
    parts = [
        embed_store([s], root / f"emb_{k}.zarr", extractor, **options) for k, s in enumerate(shards)
    ]
    whole = embed_store(shards, root / "emb_all.zarr", extractor, **options)
    return parts, whole


def test_the_union_of_shard_stores_reads_as_one_store(embedded):
    from voxelfm.extract.store import EmbeddingStore

    parts, whole = embedded
    union, single = EmbeddingStore(list(reversed(parts))), EmbeddingStore(whole)
    assert union.scan_ids == single.scan_ids == sorted(SHAPES)
    assert union.patient_ids == single.patient_ids
    assert (union.embed_dim, union.patch_size) == (single.embed_dim, single.patch_size)
    assert union.backbone == single.backbone and union.failed_scans == []
    for kind in ("cls", "pooled", "cls+pooled"):
        np.testing.assert_array_equal(union.global_features(kind), single.global_features(kind))
    subset = ["s-d", "s-a"]
    np.testing.assert_array_equal(
        union.global_features("cls", subset), single.global_features("cls", subset)
    )
    for scan_id in SHAPES:
        tokens, affine = union.patch_tokens(scan_id)
        expected_tokens, expected_affine = single.patch_tokens(scan_id)
        np.testing.assert_array_equal(tokens, expected_tokens)
        np.testing.assert_array_equal(affine, expected_affine)
        assert union.patch_geometry(scan_id) == single.patch_geometry(scan_id)
    provenance = union.attrs["preprocessing"]
    assert provenance["stores"] == single.attrs["preprocessing"]["stores"]
    assert provenance["spacing_mm"] == [[2.0, 2.0, 2.0]]
    assert union.attrs["n_scans"] == 4 and len(union.attrs["parts"]) == 2
    assert EmbeddingStore([whole]).attrs == single.attrs  # one path: the store as it is


def test_a_union_of_unrelated_stores_is_refused(embedded, tmp_path):
    from voxelfm.errors import InputError
    from voxelfm.extract.embed import embed_store
    from voxelfm.extract.store import EmbeddingStore

    parts, whole = embedded
    with pytest.raises(InputError, match="also in"):
        EmbeddingStore([parts[0], whole])
    other = embed_store(
        [parts[0].parent / "shard_000.zarr"],
        tmp_path / "other.zarr",
        {"kind": "handcrafted"},
        name="tiny",
        progress=False,
    )
    with pytest.raises(InputError, match="differs"):
        EmbeddingStore([other, parts[1]])


def test_the_probe_command_reads_several_stores(embedded, tmp_path):
    """`voxelfm probe --embeddings A B` gives the probe result of one store of A and B."""
    import pandas as pd

    from voxelfm.cli import main

    parts, whole = embedded
    labels = pd.DataFrame(
        {
            "scan_id": sorted(SHAPES),
            "patient_id": ["p0", "p0", "p1", "p1"],
            "split": ["train", "train", "test", "test"],
            "target": [1.0, 2.0, 3.0, 4.0],
        }
    )
    labels.to_csv(tmp_path / "labels.csv", index=False)
    task = '{"category": "retrieval", "probes": ["gallery"]}'
    results = {}
    for name, stores in (("union", parts), ("single", [whole])):
        out = tmp_path / name
        argv = ["probe", "--embeddings", *map(str, stores), "--labels", str(tmp_path / "labels.csv"),
                "--task-name", "t", "--task", task, "--bootstrap", '{"n_boot": 20}', "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        results[name] = (out / "metrics.csv").read_text()
    assert results["union"] == results["single"]


# -- several nodes -------------------------------------------------------------------------


def test_several_nodes_launch_one_torchrun_per_node_through_srun(tmp_path):
    from voxelfm.errors import VoxelFMError
    from voxelfm.train.launch import distributed_command

    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2"}
    command = distributed_command(tmp_path, 8, gpus=4, nodes=2, env=env)
    assert command[:5] == [
        "srun",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
    ]
    assert "--nnodes=2" in command and "--nproc-per-node=4" in command
    assert "--rdzv-backend=c10d" in command and "--rdzv-id=slurm-4242" in command
    endpoint = next(a for a in command if a.startswith("--rdzv-endpoint="))
    assert endpoint == f"--rdzv-endpoint={socket.gethostname()}:{20000 + 4242}"
    assert command[-4:] == ["--work-dir", str(tmp_path), "--threads", "8"]
    single = distributed_command(tmp_path, 8, gpus=4, nodes=1, env={})
    assert "--standalone" in single and "srun" not in single
    with pytest.raises(VoxelFMError, match="SLURM_JOB_ID"):
        distributed_command(tmp_path, 8, gpus=4, nodes=2, env={})
    with pytest.raises(VoxelFMError, match="1 node"):
        distributed_command(tmp_path, 8, gpus=4, nodes=2, env={**env, "SLURM_JOB_NUM_NODES": "1"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_like_one_process(tmp_path):
    """Two torchrun agents (the multi-node command line, rendezvous on localhost) with one
    gloo process each against one process on the same global batch: same weights, same
    gradients."""
    import torch
    import torch.distributed as dist

    if not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    from test_train_ddp import CASES, STEPS, _cfg, _state, micro_batches

    from voxelfm.train.launch import torchrun_arguments
    from voxelfm.train.trainer import DistributedContext, Pretrainer

    torchrun = torchrun_arguments(
        nodes=2, processes_per_node=1, rendezvous=f"127.0.0.1:{_free_port()}", run_id="two-nodes"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    agents = [
        subprocess.Popen(
            [*torchrun, __file__, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:  # only the agents started above
            if agent.poll() is None:
                agent.kill()
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-3000:]

    total, _, per_process = CASES["accum1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = DistributedContext(rank=0, world_size=1, device=torch.device("cpu"))
        trainer = Pretrainer(_cfg(total, per_process), tmp_path / "single", single, progress=False)
        assert trainer.run(micro_batches(0, 1)) == STEPS
        expected = _state(trainer)
    finally:
        torch.set_num_threads(threads)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for part in ("model", "grads"):
            assert state[part].keys() == expected[part].keys()
            for name, value in expected[part].items():
                torch.testing.assert_close(state[part][name], value, rtol=1e-4, atol=1e-5)


def _node_worker(out_dir: Path) -> None:
    """One training process of the two-node test: trains on its share of each micro-batch."""
    import torch
    import torch.distributed as dist
    from test_train_ddp import CASES, STEPS, _cfg, _state, micro_batches

    from voxelfm.train.trainer import Pretrainer, init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed()
    try:
        assert ctx.world_size == 2 and os.environ["LOCAL_RANK"] == "0"  # one per "node"
        total, per_rank, _ = CASES["accum1"]
        trainer = Pretrainer(_cfg(total, per_rank), out_dir / "work", ctx, progress=False)
        assert trainer.run(micro_batches(ctx.rank, ctx.world_size)) == STEPS
        torch.save(_state(trainer), out_dir / f"rank{ctx.rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _node_worker(Path(sys.argv[1]))


def test_an_empty_shard_adds_nothing_to_the_union(embedded, tmp_path):
    """A shard without a complete scan embeds to an empty store (with --allow-empty, as the
    workflow runs it); the union reads past it, and a union of nothing but empty stores is
    an error."""
    from voxelfm.errors import InputError, VoxelFMError
    from voxelfm.extract.store import EmbeddingStore, write_embeddings

    parts, whole = embedded
    description = EmbeddingStore(parts[0]).attrs
    options = {"mode": description["mode"], "extraction": description["extraction"]}
    with pytest.raises(VoxelFMError, match="no scan could be embedded"):
        write_embeddings(tmp_path / "refused.zarr", [], description["backbone"], **options)
    empty = write_embeddings(
        tmp_path / "empty.zarr", [], description["backbone"], allow_empty=True, **options
    )
    assert len(EmbeddingStore(empty)) == 0
    union = EmbeddingStore([*parts, empty])
    assert union.scan_ids == EmbeddingStore(whole).scan_ids
    np.testing.assert_array_equal(union.global_features(), EmbeddingStore(whole).global_features())
    with pytest.raises(InputError, match="holds a scan"):
        EmbeddingStore([empty, empty])
