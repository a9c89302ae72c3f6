"""Hostile conditions at the training layer: kills at random moments, stale work folders,
unsafe checkpoint files, and power loss around atomic renames.

The pretraining runs here use the default recipe (drop path 0.1) shrunk to a tiny ViT, a
tiny synthetic store and a real DataLoader with a worker process.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from voxelfm.errors import InputError
from voxelfm.store import write_scan
from voxelfm.train.checkpoint import list_checkpoints, load_checkpoint
from voxelfm.train.config import resolve_ssl_config
from voxelfm.train.launch import FINAL_CHECKPOINT, launch_pretraining, micro_batches
from voxelfm.train.settings import SSLSettings
from voxelfm.train.trainer import DistributedContext, Pretrainer
from voxelfm.utils import atomic
from voxelfm.volume import CanonicalVolume

CPU = DistributedContext(rank=0, world_size=1, device=torch.device("cpu"))

# The default recipe (drop_path_rate 0.1 included) made small enough to train in seconds.
TINY_RECIPE = {
    "model": {"preset": "tiny"},
    "dino": {"head_n_prototypes": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
    "ibot": {"head_n_prototypes": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
    "crops": {"global_crops_size": 16, "local_crops_size": 8, "local_crops_number": 2},
    "train": {
        "batch_size_per_gpu": 2,
        "total_batch_size": 2,
        "epochs": 2,
        "official_epoch_length": 4,
        "compute_precision": "fp32",
        "num_workers": 1,
    },
    "checkpointing": {"period_iterations": 1, "max_to_keep": 2},
    "monitoring": {"log_period_iterations": 2},
}


def write_tiny_store(path: Path, seed: int, n_scans: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    for n in range(n_scans):
        image = rng.integers(-1000, 1000, size=(24, 22, 20)).astype(np.int16)
        write_scan(path, f"scan{n}", f"p{n}", CanonicalVolume(image, (1.5,) * 3, (0.0,) * 3))
    return path


def pretrain_command(store: Path, root: Path) -> list[str]:
    return [
        sys.executable, "-m", "voxelfm", "pretrain", "--stores", str(store),
        "--out", str(root / "run"), "--work-dir", str(root / "work"),
        "--overrides", json.dumps(TINY_RECIPE), "--threads", "1",
    ]  # fmt: skip


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "run" / FINAL_CHECKPOINT, weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return write_tiny_store(tmp_path_factory.mktemp("store") / "shard_000.zarr", seed=0)


# --------------------------------------------------------------- hole 7: exact resume


def test_resume_with_drop_path_and_a_real_dataloader_is_bit_identical(tiny_store, tmp_path):
    """The DataLoader iterator draws its worker seed from torch's global generator when it
    starts; a resumed run starts it after restoring the checkpoint's RNG state, so drop path
    must not see that draw."""
    config = resolve_ssl_config(TINY_RECIPE)
    settings = SSLSettings.from_config(config)
    assert settings.model.drop_path_rate > 0 and settings.train.num_workers > 0
    torch.set_num_threads(1)

    straight = Pretrainer(config, tmp_path / "a", CPU, progress=False)
    assert straight.run(micro_batches(settings, [str(tiny_store)], 0, 1, 0)) == 8

    first = Pretrainer(config, tmp_path / "b", CPU, progress=False)
    assert first.run(micro_batches(settings, [str(tiny_store)], 0, 1, 0), stop_at=3) == 3
    resumed = Pretrainer(config, tmp_path / "b", CPU, progress=False)
    assert resumed.start_iteration == 3
    start = resumed.start_iteration * resumed.accum
    batches = micro_batches(settings, [str(tiny_store)], 0, 1, start)
    assert resumed.run(batches) == 8
    assert_same_weights(straight.model.state_dict(), resumed.model.state_dict())


# ------------------------------------------- "done when": kills at random moments


def newest_checkpoint(root: Path) -> int:
    """Iteration of the newest checkpoint under ``root``'s work folder (0: none yet)."""
    folders = (root / "work").glob("*/checkpoints")
    return max((it for folder in folders for it, _ in list_checkpoints(folder)), default=0)


@pytest.mark.slow  # eleven pretraining processes: about a minute on 2 idle cores
def test_pretraining_killed_at_random_moments_ends_with_identical_weights(tiny_store, tmp_path):
    """Five runs SIGKILLed (with their DataLoader worker) at random moments, each rerun to
    the end: every published checkpoint equals the uninterrupted one. A kill moment is a
    random iteration (0 = still starting up) plus a random fraction of a second, so the
    kills land inside the run however loaded the machine is."""
    reference = tmp_path / "reference"
    subprocess.run(pretrain_command(tiny_store, reference), check=True, capture_output=True)
    expected = final_weights(reference)
    total_iterations = SSLSettings.from_config(
        resolve_ssl_config(TINY_RECIPE)
    ).train.total_iterations

    rng = random.Random(1234)
    killed = 0
    for trial in range(5):
        root = tmp_path / f"trial{trial}"
        process = subprocess.Popen(
            pretrain_command(tiny_store, root),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        kill_after = rng.randrange(total_iterations)
        while process.poll() is None and newest_checkpoint(root) < kill_after:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            killed += 1
        process.wait()
        rerun = subprocess.run(
            pretrain_command(tiny_store, root), capture_output=True, text=True, check=False
        )
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert_same_weights(expected, final_weights(root))
    assert killed >= 4, f"only {killed} of 5 runs were still going when killed"


# ------------------------------------------ hole 8: no resume across a data change


def test_reingested_store_at_the_same_path_gives_new_weights(tmp_path, capsys):
    store = write_tiny_store(tmp_path / "data" / "shard_000.zarr", seed=0)
    options = {"stores": [str(store)], "out_dir": tmp_path / "run", "work_dir": tmp_path / "work",
               "overrides": TINY_RECIPE, "threads": 1}  # fmt: skip
    launch_pretraining(**options)
    before = final_weights(tmp_path)

    # Re-ingest different data at the same path (as a changed spacing_mm would).
    shutil.rmtree(store)
    write_tiny_store(store, seed=1)
    capsys.readouterr()
    launch_pretraining(**options)
    assert "resumed from" not in capsys.readouterr().out
    after = final_weights(tmp_path)
    assert any(not torch.equal(before[k], after[k]) for k in before), "old weights republished"
    assert len(list((tmp_path / "work").iterdir())) == 2, "one work folder per data version"


def test_work_folder_key_changes_with_data_recipe_and_code(tmp_path, monkeypatch):
    from voxelfm.train import launch

    store = write_tiny_store(tmp_path / "shard_000.zarr", seed=0)
    config = resolve_ssl_config(TINY_RECIPE)
    key = launch.run_key(config, [str(store)])
    assert key == launch.run_key(config, [str(store)])
    changed_recipe = resolve_ssl_config({**TINY_RECIPE, "model": {"drop_path_rate": 0.2}})
    assert launch.run_key(changed_recipe, [str(store)]) != key
    monkeypatch.setattr(launch, "code_version", lambda: "another version")
    assert launch.run_key(config, [str(store)]) != key


# ---------------------------------------------------- hole 9: unsafe checkpoint files


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _unsafe_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    garbage = folder / "garbage.pt"
    garbage.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    code = folder / "code.pt"
    torch.save({"model": {}, "payload": _RunsCode(folder / "PWNED")}, code)
    plain_pickle = folder / "plain.pth"
    plain_pickle.write_bytes(pickle.dumps(_RunsCode(folder / "PWNED")))
    truncated = folder / "truncated.pt"
    torch.save({"model": {"w": torch.zeros(100)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    return {"garbage": garbage, "code": code, "plain_pickle": plain_pickle, "truncated": truncated}


def _loaders():
    from voxelfm.extract.foreign.common import read_weight_file
    from voxelfm.models.weights import load_published_checkpoint

    return {
        "training checkpoint": load_checkpoint,
        "published checkpoint": lambda p: load_published_checkpoint(p, preset="tiny"),
        "foreign weights": lambda p: read_weight_file(p, "SomeModel", "it"),
    }


@pytest.mark.parametrize(
    "loader", ["training checkpoint", "published checkpoint", "foreign weights"]
)
@pytest.mark.parametrize("kind", ["garbage", "code", "plain_pickle", "truncated"])
def test_unsafe_or_garbage_checkpoint_is_named_and_never_suggests_unsafe_loading(
    tmp_path, loader, kind
):
    path = _unsafe_files(tmp_path)[kind]
    with pytest.raises(InputError) as caught:
        _loaders()[loader](path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "not a safe weights file" in message
    assert "weights_only" not in message
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------- hole 12: fsync around renames


def _record_durability(monkeypatch) -> list[tuple]:
    events: list[tuple] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("rename", str(src), str(dst)))
        return real_replace(src, dst, **kwargs)

    def rename(src, dst, **kwargs):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


def _assert_durable_rename(events: list[tuple], destination: Path) -> None:
    """The renamed file (or every file of a renamed folder) was fsynced before the rename,
    and the destination's folder after it."""
    renames = [n for n, e in enumerate(events) if e[0] == "rename" and e[2] == str(destination)]
    assert renames, f"no rename to {destination}: {events}"
    at = renames[-1]
    source = events[at][1]
    before = [e[1] for e in events[:at] if e[0] == "fsync"]
    assert any(p == source or p.startswith(source + os.sep) for p in before), (source, events)
    after = [e[1] for e in events[at + 1 :] if e[0] == "fsync"]
    assert str(destination.parent) in after, events


def test_atomic_file_writes_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    import pandas as pd

    events = _record_durability(monkeypatch)
    atomic.write_csv_atomically(pd.DataFrame({"a": [1]}), tmp_path / "t.csv")
    _assert_durable_rename(events, tmp_path / "t.csv")
    events.clear()
    atomic.atomic_write_bytes(tmp_path / "ckpt.pt", b"x" * 10)
    _assert_durable_rename(events, tmp_path / "ckpt.pt")


def test_atomic_folders_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = _record_durability(monkeypatch)
    for attempt in range(2):  # a new folder, then replacing an existing one
        with atomic.atomic_directory(tmp_path / "run") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "weights.bin").write_bytes(b"w" * 10)
        _assert_durable_rename(events, tmp_path / "run")
        assert any(e[0] == "fsync" and e[1].endswith("/sub/weights.bin") for e in events)
        events.clear()


def test_a_scan_committed_into_a_store_is_fsynced(tmp_path, monkeypatch):
    events = _record_durability(monkeypatch)
    image = np.zeros((8, 8, 8), np.int16) + 5
    write_scan(tmp_path / "s.zarr", "scan0", "p0", CanonicalVolume(image, (1.0,) * 3, (0.0,) * 3))
    _assert_durable_rename(events, tmp_path / "s.zarr" / "scan0")


def test_checkpoints_listed_after_a_save_are_durable(tmp_path, monkeypatch):
    from voxelfm.train.checkpoint import save_checkpoint

    events = _record_durability(monkeypatch)
    path = save_checkpoint(tmp_path, 3, {"model": {"w": torch.ones(2)}}, max_to_keep=2)
    _assert_durable_rename(events, path)
    assert list_checkpoints(tmp_path) == [(3, path)]
