"""The workflow on a real (single-node) SLURM cluster, through the repository's slurm profile.

The `slurm` tests start the cluster of ``voxelfm.devtools.slurm_cluster`` (munged, MariaDB +
slurmdbd, slurmctld, slurmd; four fake H100s), run the tiny demo
(``profiles/slurm-dev/tiny_demo.yaml``) with ``--profile profiles/slurm --profile
profiles/slurm-dev``, and compare its results table with a local run of the same config.
They need root and the installed packages (``.ci/run`` installs them with
``python -m voxelfm.devtools.slurm_cluster install``) and are skipped otherwise. The cluster
is stopped afterwards (also on failure) unless it was already running before the tests.

Also here, without a cluster: a job given GPUs that finds no CUDA stops at once, and
``voxelfm install-profile``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from voxelfm.cli import main
from voxelfm.devtools.slurm_cluster import Cluster, ClusterError
from voxelfm.profiles import install_profile
from voxelfm.utils.gpu import CPU_FALLBACK_ENV

TINY_DEMO = REPO_ROOT / "profiles" / "slurm-dev" / "tiny_demo.yaml"
# Every rule of the workflow but adapt_dataset (it needs a public dataset's folder) and the
# local target rule `all`.
RULES = {
    "synthesize_cohort", "validate_manifest", "split_manifest", "preprocess_shard",
    "summarize_dataset", "pretrain", "export_teacher", "embed", "probe", "probe_dense",
    "aggregate",
}  # fmt: skip
GPU_RULES = {"pretrain": 4, "embed": 1, "probe_dense": 1}  # GPUs per job in profiles/slurm


def _env(**extra: str) -> dict[str, str]:
    """The test's environment with this Python's bin folder (voxelfm, snakemake) first."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, **extra}
    env.pop(CPU_FALLBACK_ENV, None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running cluster: started here and stopped afterwards, or one already running."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (it starts system daemons)")
    cluster = Cluster()
    missing = cluster.missing_binaries()
    if missing:
        pytest.skip(
            f"SLURM not installed ({', '.join(missing)} missing): run "
            "`python -m voxelfm.devtools.slurm_cluster install` (apt-get; .ci/run does)"
        )
    already = cluster.running()
    if len(already) == 5:
        yield cluster
        return
    try:
        cluster.start()
    except ClusterError as error:
        pytest.skip(f"the SLURM test cluster could not start: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.running()


def _sacct_since(start: str) -> list[dict[str, str]]:
    fields = ["JobID", "JobName", "Comment", "Partition", "AllocTRES", "State"]
    result = subprocess.run(
        ["sacct", "-a", "-X", "-n", "-P", "-S", start, "-o", ",".join(fields)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [dict(zip(fields, line.split("|"))) for line in result.stdout.splitlines() if line]


def _gpus(tres: str) -> int:
    for item in tres.split(","):
        if item.startswith("gres/gpu="):
            return int(item.split("=")[1])
    return 0


@pytest.mark.slurm
@pytest.mark.slow
def test_the_demo_runs_on_slurm_like_it_runs_locally(slurm_cluster, tmp_path):
    """Every rule submitted through profiles/slurm (GPU rules with their GPUs) completes,
    and the results table equals a local run's."""
    config = ["--configfile", str(TINY_DEMO)]
    local = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--cores", "1", *config,
         "--config", f"results_dir={tmp_path / 'local'}"],
        cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    start = time.strftime("%Y-%m-%dT%H:%M:%S")
    started = time.monotonic()
    on_slurm = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", "profiles/slurm",
         "--profile", "profiles/slurm-dev", *config,
         "--config", f"results_dir={tmp_path / 'slurm'}"],
        cwd=REPO_ROOT, env=_env(**{CPU_FALLBACK_ENV: "1"}), capture_output=True, text=True,
        timeout=1200, check=False,
    )  # fmt: skip
    wall = time.monotonic() - started
    local_out, _ = local.communicate(timeout=1200)
    assert on_slurm.returncode == 0, on_slurm.stdout[-4000:] + on_slurm.stderr[-4000:]
    assert local.returncode == 0, local_out[-4000:]

    jobs = [j for j in _sacct_since(start) if j["Comment"].startswith("rule_")]
    rules = {j["Comment"].removeprefix("rule_").split("_wildcards_")[0] for j in jobs}
    print(f"SLURM run: {len(jobs)} jobs in {wall:.0f} s")
    assert rules == RULES, sorted(rules)
    assert all(j["State"] == "COMPLETED" for j in jobs), jobs
    for job in jobs:
        rule = job["Comment"].removeprefix("rule_").split("_wildcards_")[0]
        assert _gpus(job["AllocTRES"]) == GPU_RULES.get(rule, 0), job
        assert job["Partition"] == ("gpu" if rule in GPU_RULES else "cpu"), job
    log = (tmp_path / "slurm" / "logs" / "pretrain.log").read_text()
    assert "CUDA is not available" in log and "running on CPU" in log, log[-2000:]

    table = "report/results.csv"
    assert (tmp_path / "slurm" / table).read_text() == (tmp_path / "local" / table).read_text()


@pytest.mark.slurm
def test_a_gpu_job_without_cuda_fails_at_once(slurm_cluster, tmp_path):
    """Submitted with a GPU, no CUDA, no fallback: the job fails in seconds saying why."""
    out = tmp_path / "job.out"
    started = time.monotonic()
    job = shlex.join(
        ["voxelfm", "embed", "--stores", str(tmp_path / "none.zarr"), "--backbone", "b",
         "--spec", '{"kind": "handcrafted"}', "--out", str(tmp_path / "out.zarr")]
    )  # fmt: skip
    result = subprocess.run(
        ["sbatch", "--parsable", "--wait", f"--account={slurm_cluster.account}",
         "--partition=gpu", "--gpus=h100:1", "--cpus-per-gpu=1", "--mem=1000",
         f"--output={out}", "--wrap", job],
        env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    text = out.read_text()
    assert "SLURM gave this job 1 GPU(s)" in text and "CUDA is not available" in text, text
    assert CPU_FALLBACK_ENV in text and "Traceback" not in text, text


def test_gpus_from_slurm_without_cuda_are_an_error(monkeypatch, capsys, tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "1")
    monkeypatch.delenv(CPU_FALLBACK_ENV, raising=False)
    args = ["embed", "--stores", str(tmp_path / "none.zarr"), "--backbone", "b",
            "--spec", '{"kind": "handcrafted"}', "--out", str(tmp_path / "out.zarr")]  # fmt: skip
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "CUDA is not available" in error, error

    # With the fallback the same command gets past the check (and fails on the missing store).
    monkeypatch.setenv(CPU_FALLBACK_ENV, "1")
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "running on CPU" in error and "none.zarr" in error, error


def test_pretrain_falls_back_to_one_cpu_process(monkeypatch, capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    monkeypatch.delenv("SLURM_JOB_GPUS", raising=False)
    calls = {}
    monkeypatch.setattr(
        "voxelfm.train.launch.launch_pretraining", lambda **kwargs: calls.update(kwargs)
    )
    args = ["pretrain", "--stores", "s.zarr", "--out", "o", "--work-dir", "w", "--gpus", "4"]
    assert main(args) == 2 and "--gpus" not in calls
    monkeypatch.setenv(CPU_FALLBACK_ENV, "1")
    assert main(args) == 0 and calls["gpus"] == 0
    assert "4 GPU(s) requested" in capsys.readouterr().err


def test_install_profile_copies_the_profile_and_keeps_a_changed_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.chdir(REPO_ROOT)
    target = install_profile("slurm")
    assert target == tmp_path / "config" / "snakemake" / "slurm"
    source = REPO_ROOT / "profiles" / "slurm" / "config.v8+.yaml"
    assert (target / source.name).read_text() == source.read_text()
    assert install_profile("slurm") == target  # identical: nothing to do

    (target / source.name).write_text("jobs: 1\n")  # the user's own edit
    with pytest.raises(Exception, match="--force"):
        install_profile("slurm")
    install_profile("slurm", force=True)
    assert (target / source.name).read_text() == source.read_text()
    backups = list(target.parent.glob("slurm.bak-*"))
    assert len(backups) == 1 and (backups[0] / source.name).read_text() == "jobs: 1\n"


def test_snakemake_finds_the_installed_profile_by_name(tmp_path):
    env = _env(XDG_CONFIG_HOME=str(tmp_path / "config"))
    installed = subprocess.run(
        [sys.executable, "-m", "voxelfm", "install-profile", "slurm"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    assert str(tmp_path / "config" / "snakemake" / "slurm") in installed.stdout
    dry = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--profile", "slurm",
         "--config", f"results_dir={tmp_path / 'results'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "Using profile slurm" in dry.stderr and "gpu=4" in dry.stdout
