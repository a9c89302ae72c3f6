"""The pretraining loop on CPU with a tiny model: exact resume, gradient accumulation,
schedules, EMA teacher, divergence detection and safe checkpoint loading.

Every test compares real numbers from :class:`voxelfm.train.trainer.Pretrainer` runs on
synthetic crops (tiny ViT, 256 prototypes, 32^3 global / 16^3 local crops, batch 4).
"""

from __future__ import annotations

import copy
import csv
import itertools
import math
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.train.checkpoint import list_checkpoints, load_checkpoint
from voxelfm.train.config import resolve_ssl_config
from voxelfm.train.settings import SSLSettings
from voxelfm.train.trainer import DistributedContext, Pretrainer, build_schedules

GLOBAL = 32  # global crop edge; tiny preset patch 8 -> 4^3 = 64 tokens
LOCAL = 16
N_TOKENS = (GLOBAL // 8) ** 3
N_LOCAL = 2
CPU = DistributedContext(rank=0, world_size=1, device=torch.device("cpu"))

TINY: dict[str, Any] = {
    "model": {"preset": "tiny", "drop_path_rate": 0.0},
    "dino": {"head_n_prototypes": 256, "head_hidden_dim": 128, "head_bottleneck_dim": 64},
    "ibot": {"head_n_prototypes": 256, "head_hidden_dim": 128, "head_bottleneck_dim": 64},
    "crops": {
        "global_crops_size": GLOBAL,
        "local_crops_size": LOCAL,
        "local_crops_number": N_LOCAL,
    },
    "train": {
        "batch_size_per_gpu": 4,
        "total_batch_size": 4,
        "epochs": 1,
        "official_epoch_length": 6,
        "compute_precision": "fp32",
        "num_workers": 0,
        "seed": 0,
    },
    "schedules": {
        "lr": {"warmup_epochs": 0, "freeze_last_layer_epochs": 0},
        "teacher_temp": {"warmup_epochs": 0},
    },
    "checkpointing": {"period_iterations": 2, "max_to_keep": 10},
    "monitoring": {"log_period_iterations": 1},
}


def _deep_update(base: dict, overrides: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_config(overrides: Mapping | None = None) -> dict[str, Any]:
    return resolve_ssl_config(_deep_update(TINY, overrides or {}))


def make_sample(index: int) -> dict[str, torch.Tensor]:
    """All crops of global sample ``index``: a pure function of the index."""
    gen = torch.Generator().manual_seed(10_000 + index)
    return {
        "global": torch.randn(2, 1, GLOBAL, GLOBAL, GLOBAL, generator=gen),
        "local": torch.randn(N_LOCAL, 1, LOCAL, LOCAL, LOCAL, generator=gen),
        "masks": torch.rand(2, N_TOKENS, generator=gen) < 0.3,
    }


def make_batch(indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Micro-batch of the given samples in the model's view-major layout:
    global_crops = [view 0 of every sample, view 1 of every sample], same for the rest."""
    samples = [make_sample(i) for i in indices]
    return {
        "global_crops": torch.cat([s["global"][v : v + 1] for v in range(2) for s in samples]),
        "local_crops": torch.cat([s["local"][v : v + 1] for v in range(N_LOCAL) for s in samples]),
        "masks": torch.cat([s["masks"][v : v + 1] for v in range(2) for s in samples]),
    }


def micro_batches(batch_size: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batch k holds samples [k*B, (k+1)*B); starts at micro-batch ``start``."""
    k = start
    while True:
        yield make_batch(range(k * batch_size, (k + 1) * batch_size))
        k += 1


def student_params(trainer: Pretrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.student.named_parameters()}


def teacher_params(trainer: Pretrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.teacher.named_parameters()}


def centres(trainer: Pretrainer) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in trainer.model.state_dict().items() if "centre" in n}


@pytest.fixture(autouse=True, scope="module")
def _isolate_process_state():
    # One intra-op thread: on a shared 2-core machine two spinning threads run several
    # times slower, and results are bit-reproducible either way within one process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Pretrainer.run installs SIGTERM/SIGUSR1 handlers and never restores them; keep the
    # pytest process killable by SIGTERM after these tests.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- exact resume

RESUME_OVERRIDES = {
    # Stochastic depth on, so the checkpointed RNG state matters; schedules that move
    # across the resume point (lr warmup, last-layer freeze, teacher-temp warmup).
    "model": {"drop_path_rate": 0.2},
    "train": {"epochs": 2, "official_epoch_length": 3},
    "schedules": {
        "lr": {"warmup_epochs": 1, "freeze_last_layer_epochs": 1},
        "teacher_temp": {"warmup_epochs": 2},
    },
}


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """Run A: 6 iterations straight. Run B: killed after iteration 5 with checkpoint 5 lost
    (metrics of iteration 5 already logged), resumed by a new Pretrainer from checkpoint 4."""
    config = tiny_config(RESUME_OVERRIDES)
    batch = SSLSettings.from_config(config).train.batch_size_per_gpu
    root = tmp_path_factory.mktemp("resume")

    a = Pretrainer(config, root / "a", CPU, progress=False)
    assert a.start_iteration == 0
    assert a.run(micro_batches(batch, 0)) == 6
    a_rng = torch.get_rng_state()

    b1 = Pretrainer(config, root / "b", CPU, progress=False)
    assert b1.run(micro_batches(batch, 0), stop_at=5) == 5
    saved = [it for it, _ in list_checkpoints(b1.checkpoint_dir)]
    assert saved == [2, 4, 5], f"checkpoints at multiples of the period and at the stop: {saved}"
    del b1
    # Simulate a kill while checkpoint 5 was being written: the newest durable one is 4.
    (root / "b" / "checkpoints" / "ckpt_000000005.pt").unlink()

    b2 = Pretrainer(config, root / "b", CPU, progress=False)
    start = b2.start_iteration
    assert b2.run(micro_batches(batch, start * b2.accum)) == 6
    return {
        "a": a,
        "b": b2,
        "b_start": start,
        "a_rng": a_rng,
        "b_rng": torch.get_rng_state(),
        "root": root,
    }


def test_resume_starts_from_newest_checkpoint(resume_runs):
    assert resume_runs["b_start"] == 4


def test_resume_equals_uninterrupted_bit_for_bit(resume_runs):
    a, b = resume_runs["a"], resume_runs["b"]
    a_state, b_state = a.model.state_dict(), b.model.state_dict()
    assert a_state.keys() == b_state.keys()
    assert any("centre" in k for k in a_state), "loss centres must be part of the model state"
    differing = [k for k in a_state if not torch.equal(a_state[k], b_state[k])]
    assert not differing, f"student/teacher/centre tensors differ after resume: {differing[:8]}"
    # Training really moved the weights (otherwise equality would prove nothing).
    init = Pretrainer(
        tiny_config(RESUME_OVERRIDES), resume_runs["root"] / "fresh", CPU, progress=False
    )
    moved = [k for k, v in init.model.state_dict().items() if not torch.equal(v, a_state[k])]
    assert len(moved) > len(a_state) // 2

    a_opt, b_opt = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert a_opt["state"].keys() == b_opt["state"].keys() and a_opt["state"]
    for pid, a_entry in a_opt["state"].items():
        for key, value in a_entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b_opt["state"][pid][key])), (
                f"optimizer state {pid}/{key} differs after resume"
            )
    for ga, gb in zip(a_opt["param_groups"], b_opt["param_groups"]):
        assert (ga["lr"], ga["weight_decay"], ga["params"]) == (
            gb["lr"],
            gb["weight_decay"],
            gb["params"],
        )
    assert torch.equal(resume_runs["a_rng"], resume_runs["b_rng"]), "RNG state differs after resume"

    # The final checkpoints on disk agree too.
    a_ckpt = load_checkpoint(list_checkpoints(a.checkpoint_dir)[-1][1])
    b_ckpt = load_checkpoint(list_checkpoints(b.checkpoint_dir)[-1][1])
    assert a_ckpt["iteration"] == b_ckpt["iteration"] == 6
    assert all(torch.equal(a_ckpt["model"][k], b_ckpt["model"][k]) for k in a_ckpt["model"])


def _read_metrics(work_dir: Path) -> list[dict[str, str]]:
    with open(work_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_resume_metrics_log_has_every_iteration_once(resume_runs):
    a_rows = _read_metrics(resume_runs["root"] / "a")
    b_rows = _read_metrics(resume_runs["root"] / "b")
    a_its = [int(r["iteration"]) for r in a_rows]
    b_its = [int(r["iteration"]) for r in b_rows]
    assert a_its == [1, 2, 3, 4, 5, 6]
    assert len(b_its) == len(set(b_its)), f"duplicated iterations in resumed metrics.csv: {b_its}"
    assert b_its == a_its, (
        f"resumed metrics.csv has iterations {b_its}, expected {a_its}. Row k holds the "
        "metrics of the k-th completed step, which checkpoint k already contains, so resuming "
        "from checkpoint 4 must keep row 4: voxelfm/train/monitor.py MetricsLog.__init__ "
        "filters rows with `int(r['iteration']) < start_iteration`; it must be `<=` (and "
        "SummaryWriter(purge_step=start_iteration + 1))."
    )
    columns = [c for c in a_rows[0] if c != "samples_per_s"]  # wall-clock, not reproducible
    for ra, rb in zip(a_rows, b_rows):
        assert {c: ra[c] for c in columns} == {c: rb[c] for c in columns}, (
            f"metrics of iteration {ra['iteration']} differ between the straight and the "
            "resumed run"
        )


# --------------------------------------------------------------------- gradient accumulation


def test_accumulation_matches_one_large_batch(tmp_path):
    # KoLeo off: the model computes KoLeo per micro-batch (nearest neighbours within each
    # micro-batch of 4), so with it on, accumulation legitimately differs from one batch of 8.
    # DINO and iBOT are per-sample means and split exactly. Clipping off so that a wrong
    # gradient scale (e.g. a missing 1/accum) cannot hide behind the clip; drop_path off.
    common = {"dino": {"koleo_loss_weight": 0.0}, "optim": {"clip_grad": 0.0}}
    one = Pretrainer(
        tiny_config(
            _deep_update(common, {"train": {"batch_size_per_gpu": 8, "total_batch_size": 8}})
        ),
        tmp_path / "one",
        CPU,
        progress=False,
    )
    two = Pretrainer(
        tiny_config(
            _deep_update(common, {"train": {"batch_size_per_gpu": 4, "total_batch_size": 8}})
        ),
        tmp_path / "two",
        CPU,
        progress=False,
    )
    assert (one.accum, two.accum) == (1, 2)
    before = student_params(one)
    assert all(torch.equal(before[n], p) for n, p in student_params(two).items())

    m1 = one.train_step([make_batch(range(8))], 0)
    m2 = two.train_step([make_batch(range(4)), make_batch(range(4, 8))], 0)
    for key in ("loss_total", "loss_dino", "loss_ibot"):
        assert math.isclose(m1[key], m2[key], rel_tol=1e-5), (key, m1[key], m2[key])

    grads1 = {n: p.grad for n, p in one.model.student.named_parameters() if p.grad is not None}
    grads2 = {n: p.grad for n, p in two.model.student.named_parameters() if p.grad is not None}
    assert grads1.keys() == grads2.keys() and grads1
    scale = max(float(g.abs().max()) for g in grads1.values())
    for name, grad in grads1.items():
        torch.testing.assert_close(
            grads2[name],
            grad,
            rtol=1e-4,
            atol=1e-6 * scale,
            msg=lambda m, n=name: f"gradient of {n}: {m}",
        )
    # AdamW's first moments are linear in the gradient: a strict check of the update rule's
    # input (its first step, g / (|g| + eps), hides any gradient scale error).
    state1, state2 = one.optimizer.state_dict()["state"], two.optimizer.state_dict()["state"]
    for pid, entry in state1.items():
        torch.testing.assert_close(
            state2[pid]["exp_avg"], entry["exp_avg"], rtol=1e-4, atol=1e-6 * scale * 0.1
        )
    after1, after2 = student_params(one), student_params(two)
    assert any(not torch.equal(before[n], after1[n]) for n in before), "the step changed nothing"
    for name in after1:
        # AdamW's first step moves each element by lr * g / (|g| + eps): where |g| is near
        # eps (1e-8) float noise in g changes that element's step by percents, so parameters
        # are compared where |g| >> eps; the gradients above cover every element.
        if name in grads1:
            well_conditioned = grads1[name].abs() > 1e-6
            torch.testing.assert_close(
                after2[name][well_conditioned], after1[name][well_conditioned], rtol=1e-5, atol=1e-6
            )
        else:
            torch.testing.assert_close(after2[name], after1[name], rtol=1e-5, atol=1e-6)
    for name, value in teacher_params(one).items():
        torch.testing.assert_close(teacher_params(two)[name], value, rtol=1e-5, atol=1e-6)
    c1, c2 = centres(one), centres(two)
    for name in c1:
        torch.testing.assert_close(c2[name], c1[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ schedules


def test_schedules_from_config():
    config = tiny_config(
        {
            "train": {"epochs": 4, "official_epoch_length": 10, "total_batch_size": 4},
            "schedules": {
                "lr": {
                    "start": 0.0,
                    "peak": 1e-3,
                    "end": 1e-6,
                    "warmup_epochs": 1,
                    "freeze_last_layer_epochs": 1,
                },
                "weight_decay": {"start": 0.04, "end": 0.2},
                "momentum": {"start": 0.99, "end": 0.999},
                "teacher_temp": {"start": 0.04, "peak": 0.07, "warmup_epochs": 2},
            },
        }
    )
    s = build_schedules(SSLSettings.from_config(config))
    last = 39
    approx = pytest.approx
    assert s.lr(0) == 0.0
    assert s.lr(5) == approx(5e-4)
    assert s.lr(10) == approx(1e-3)  # end of warmup: the peak
    assert s.lr(last) == approx(1e-6)
    lrs = [s.lr(i) for i in range(10, last + 1)]
    assert all(x >= y for x, y in itertools.pairwise(lrs)), "lr must decay after warmup"
    assert s.teacher_temp(0) == approx(0.04)
    assert s.teacher_temp(10) == approx(0.055)
    assert s.teacher_temp(20) == approx(0.07)
    assert s.teacher_temp(last) == approx(0.07)
    assert s.weight_decay(0) == approx(0.04) and s.weight_decay(last) == approx(0.2)
    assert s.teacher_momentum(0) == approx(0.99) and s.teacher_momentum(last) == approx(0.999)
    assert s.freeze_last_layer_iters == 10
    assert s.at(9).last_layer_lr == 0.0 and s.at(9).lr > 0
    assert s.at(10).last_layer_lr == s.at(10).lr

    scaled = build_schedules(
        SSLSettings.from_config(
            _deep_update(
                config,
                {"optim": {"scaling_rule": "sqrt_wrt_1024"}, "train": {"total_batch_size": 256}},
            )
        )
    )
    assert scaled.lr(10) == approx(1e-3 * 0.5)


def test_last_layer_frozen_during_first_epoch(tmp_path):
    config = tiny_config(
        {
            "train": {"epochs": 2, "official_epoch_length": 2},
            "schedules": {"lr": {"freeze_last_layer_epochs": 1}},
        }
    )
    trainer = Pretrainer(config, tmp_path, CPU, progress=False)
    trainable = {n for n, p in trainer.model.student.named_parameters() if p.requires_grad}
    last = {n for n in trainable if "last_layer" in n.split(".")}
    assert last, "the heads have a trainable prototype layer"
    before = student_params(trainer)

    trainer.train_step([make_batch(range(4))], 0)  # epoch 0
    for group in trainer.optimizer.param_groups:
        expected = 0.0 if group["is_last_layer"] else 1e-3 * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected)
    after = student_params(trainer)
    assert all(torch.equal(before[n], after[n]) for n in last), "last layer moved in epoch 0"
    unchanged = sorted(n for n in trainable - last if torch.equal(before[n], after[n]))
    assert not unchanged, f"parameters not updated by the step: {unchanged}"

    trainer.train_step([make_batch(range(4, 8))], 2)  # epoch 1: unfrozen
    moved = student_params(trainer)
    assert all(not torch.equal(after[n], moved[n]) for n in last), "last layer frozen in epoch 1"


# ---------------------------------------------------------------------------- EMA teacher


def test_teacher_is_ema_of_student(tmp_path):
    m = 0.9
    config = tiny_config({"schedules": {"momentum": {"start": m, "end": m}}})
    trainer = Pretrainer(config, tmp_path, CPU, progress=False)
    teacher0 = teacher_params(trainer)
    student0 = student_params(trainer)
    assert all(torch.equal(teacher0[n], student0[n]) for n in teacher0), "teacher starts as a copy"

    metrics = trainer.train_step([make_batch(range(4))], 0)
    assert metrics["teacher_momentum"] == pytest.approx(m)
    student1 = student_params(trainer)
    teacher1 = teacher_params(trainer)
    changed = 0
    for name, t1 in teacher1.items():
        expected = m * teacher0[name].double() + (1 - m) * student1[name].double()
        torch.testing.assert_close(
            t1.double(),
            expected,
            rtol=1e-6,
            atol=1e-8,
            msg=lambda msg, n=name: f"teacher {n} is not the EMA: {msg}",
        )
        if not torch.equal(t1, teacher0[name]):
            changed += 1
            assert not torch.equal(t1, student1[name]), f"teacher {name} copied the student"
    assert changed > len(teacher1) // 2, "the EMA did not move the teacher"
    assert all(not p.requires_grad for p in trainer.model.teacher.parameters())


# ------------------------------------------------------------------------------ divergence


@pytest.mark.parametrize("log_period", [1000, 1], ids=["no-stats", "stats-logged"])
def test_non_finite_loss_raises_voxelfm_error(tmp_path, log_period):
    config = tiny_config({"monitoring": {"log_period_iterations": log_period}})
    trainer = Pretrainer(config, tmp_path, CPU, progress=False)

    def nan_batches():
        for batch in micro_batches(4, 0):
            batch["global_crops"].fill_(float("nan"))
            yield batch

    try:
        trainer.run(nan_batches())
    except VoxelFMError as err:
        assert "not finite" in str(err)
    except Exception as err:  # noqa: BLE001 - the wrong exception type is the failure
        pytest.fail(
            f"a non-finite loss raised {type(err).__name__}: {err} instead of VoxelFMError. "
            "On logging iterations Pretrainer.train_step runs embedding_collapse_stats "
            "(torch.linalg.svdvals) on the NaN teacher CLS before Pretrainer.run checks the "
            "loss. Fix voxelfm/train/trainer.py train_step: after the micro-batch loop, raise "
            "VoxelFMError(f'training diverged at iteration {iteration + 1}: loss is not "
            "finite') when not math.isfinite(sums['loss_total']), before clipping, "
            "optimizer.step and the statistics."
        )
    else:
        pytest.fail("training on NaN crops finished without an error")
    assert not list_checkpoints(trainer.checkpoint_dir), "a diverged state was checkpointed"


# ------------------------------------------------------------------------- safe checkpoints


class _Payload:
    """Unpickling it calls os.mkdir(marker): proof that arbitrary code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_checkpoint_loading_is_weights_only(tmp_path):
    # The payload is live: a full unpickle runs it.
    probe_marker = tmp_path / "probe_ran"
    probe = tmp_path / "probe.pt"
    torch.save({"payload": _Payload(probe_marker)}, probe)
    torch.load(probe, weights_only=False)
    assert probe_marker.is_dir()

    marker = tmp_path / "payload_ran"
    work = tmp_path / "work"
    ckpt = work / "checkpoints" / "ckpt_000000002.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": {}, "iteration": 2, "payload": _Payload(marker)}, ckpt)

    with pytest.raises(InputError) as err:
        load_checkpoint(ckpt)
    assert str(ckpt) in str(err.value)
    with pytest.raises(InputError) as err:
        Pretrainer(tiny_config(), work, CPU, progress=False)  # resumes from the newest file
    assert str(ckpt) in str(err.value)
    assert not marker.exists(), "loading a checkpoint executed pickled code"

    truncated = work / "checkpoints" / "ckpt_000000004.pt"
    truncated.write_bytes(probe.read_bytes()[:100])
    with pytest.raises(InputError, match="ckpt_000000004.pt"):
        Pretrainer(tiny_config(), work, CPU, progress=False)


def test_uniform_teacher_collapse_is_reported_once():
    from voxelfm.train.monitor import TrainingHealth

    health = TrainingHealth(128)  # log 128 = 4.85
    assert health.check(30, {"teacher_entropy": 2.9, "loss_dino": 3.5}) == []
    assert health.check(30, {"loss_total": 1.0}) == []
    warnings = health.check(60, {"teacher_entropy": 4.84, "loss_dino": 4.85})
    assert len(warnings) == 1 and "iteration 60" in warnings[0] and "teacher" in warnings[0]
    assert health.check(70, {"teacher_entropy": 4.84, "loss_dino": 4.85}) == []


def test_student_stuck_at_log_k_under_a_sharp_teacher_is_reported():
    from voxelfm.train.monitor import STALL_POINTS, TrainingHealth

    log_k = math.log(32)
    health = TrainingHealth(32)
    # A healthy loss crossing log K once on its way down is not a stall.
    for iteration, loss in enumerate([3.64, log_k + 0.01, 3.1, 2.9], start=1):
        assert health.check(iteration, {"teacher_entropy": 2.5, "loss_dino": loss}) == []
    stalled = {"teacher_entropy": 2.5, "loss_dino": log_k + 0.002}
    reports = [health.check(10 + i, stalled) for i in range(STALL_POINTS + 2)]
    assert [len(r) for r in reports] == [0] * (STALL_POINTS - 1) + [1, 0, 0]
    assert "predicts uniform targets" in reports[STALL_POINTS - 1][0]


@pytest.mark.parametrize(
    ("prototypes", "bottleneck", "n_warnings"), [(16, 64, 2), (64, 64, 0), (256, 32, 0)]
)
def test_fewer_prototypes_than_bottleneck_dimensions_is_flagged(prototypes, bottleneck, n_warnings):
    from voxelfm.train.monitor import head_warnings

    head = {"head_n_prototypes": prototypes, "head_bottleneck_dim": bottleneck}
    messages = head_warnings(
        SSLSettings.from_config(resolve_ssl_config({"dino": head, "ibot": head}))
    )
    assert len(messages) == n_warnings
    assert all("head_n_prototypes" in m for m in messages)
