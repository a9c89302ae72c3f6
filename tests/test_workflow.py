"""The Snakemake workflow: lint, dry runs of the whole DAG, and reruns of only what changed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run_snakemake(
    *args: str, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SNAKEMAKE, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        # The rules call the `voxelfm` tool installed beside this Python.
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(env or {}),
        },
    )


def jobs_in_dry_run(output: str) -> dict[str, int]:
    """Rule name -> job count from the 'Job stats' table of a dry run."""
    counts: dict[str, int] = {}
    in_table = False
    for line in output.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
            if match and match.group(1) != "total":
                counts[match.group(1)] = int(match.group(2))
            elif line.strip().startswith("total"):
                break
    return counts


def write_config(tmp_path: Path, **changes) -> Path:
    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    config["results_dir"] = str(tmp_path / "results")
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_lint_is_clean():
    result = run_snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_has_the_whole_dag(tmp_path):
    config = write_config(tmp_path)
    result = run_snakemake("-n", "--configfile", str(config))
    assert result.returncode == 0, result.stderr
    jobs = jobs_in_dry_run(result.stdout)
    assert jobs == {
        "all": 1,
        "synthesize_cohort": 1,
        "validate_manifest": 1,
        "split_manifest": 1,
        "preprocess_shard": 2,
        "summarize_dataset": 1,
        "pretrain": 1,
        "export_teacher": 1,
        "embed": 6,  # three backbones x two shards: embedding is scattered per shard
        "probe": 12,
        "probe_dense": 9,
        "aggregate": 1,
    }


def test_slurm_profile_gives_gpu_resources_to_pretraining(tmp_path):
    config = write_config(tmp_path)
    result = run_snakemake("-n", "--profile", "profiles/slurm", "--configfile", str(config))
    assert result.returncode == 0, result.stderr
    block = result.stdout.split("rule pretrain:")[1].split("\n\n")[0]
    for resource in ("gpu=", "cpus_per_gpu=", "mem_mb=", "runtime="):
        assert resource in block, f"{resource} missing from the pretrain job: {block}"
    assert "--gpus 4" in block


def test_slurm_profile_gives_a_gpu_to_extraction(tmp_path):
    config = write_config(tmp_path)
    result = run_snakemake("-n", "--profile", "profiles/slurm", "--configfile", str(config))
    assert result.returncode == 0, result.stderr
    block = result.stdout.split("rule embed:")[1].split("\n\n")[0]
    assert "gpu=1" in block and "cpus_per_gpu=" in block, block


def test_slurm_profile_gives_a_gpu_to_dense_probes_only(tmp_path):
    config = write_config(tmp_path)
    result = run_snakemake("-n", "--profile", "profiles/slurm", "--configfile", str(config))
    assert result.returncode == 0, result.stderr
    dense = result.stdout.split("rule probe_dense:")[1].split("\n\n")[0]
    assert "gpu=1" in dense and "--volumes" in dense and "--manifest" in dense, dense
    vector = result.stdout.split("rule probe:")[1].split("\n\n")[0]
    assert "gpu=1" not in vector, vector


def test_pretrained_backbone_without_pretraining_is_rejected(tmp_path):
    config = write_config(tmp_path, **{"pretrain.enabled": False})
    result = run_snakemake("-n", "--configfile", str(config))
    assert result.returncode != 0
    assert "pretrain.enabled is false" in result.stdout + result.stderr


def test_snakefile_parses_without_torch(tmp_path):
    """A torch that refuses to import proves the Snakefile never imports it."""
    fake = tmp_path / "fake_site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ImportError('torch imported at Snakefile parse time')\n"
    )
    config = write_config(tmp_path)
    result = run_snakemake("-n", "--configfile", str(config), env={"PYTHONPATH": str(fake.parent)})
    assert result.returncode == 0, result.stderr
    assert "torch imported" not in result.stdout + result.stderr


def test_invalid_config_is_rejected_by_the_schema(tmp_path):
    config = write_config(tmp_path, **{"preprocess.spacing_mm": [1.0, -1.0, 1.0]})
    result = run_snakemake("-n", "--configfile", str(config))
    assert result.returncode != 0
    assert "spacing_mm" in result.stdout + result.stderr


@pytest.mark.slow
def test_only_changed_stages_rerun(tmp_path):
    """Ingest a tiny cohort for real, then dry-run: nothing to do; change the spacing:
    only the shards and the summary rerun; change the synthetic seed: everything reruns."""
    small = {
        "datasets.synthetic.synthetic.n_patients": 4,
        "pretrain.enabled": False,
        "evaluation.enabled": False,
    }
    config = write_config(tmp_path, **small)
    result = run_snakemake("--cores", "2", "--configfile", str(config), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = tmp_path / "results" / "data" / "synthetic" / "summary"
    for name in ("summary.json", "qc.csv", "failures.csv", "mosaic.png"):
        assert (summary / name).is_file(), name

    unchanged = run_snakemake("-n", "--configfile", str(config))
    assert unchanged.returncode == 0, unchanged.stderr
    assert jobs_in_dry_run(unchanged.stdout) == {}, unchanged.stdout

    respaced = write_config(tmp_path, **small, **{"preprocess.spacing_mm": [5.0, 5.0, 5.0]})
    changed = run_snakemake("-n", "--configfile", str(respaced))
    assert changed.returncode == 0, changed.stderr
    assert jobs_in_dry_run(changed.stdout) == {
        "all": 1,
        "preprocess_shard": 2,
        "summarize_dataset": 1,
    }

    reseeded = write_config(tmp_path, **small, **{"datasets.synthetic.synthetic.seed": 7})
    everything = jobs_in_dry_run(run_snakemake("-n", "--configfile", str(reseeded)).stdout)
    assert everything.get("synthesize_cohort") == 1
    assert everything.get("preprocess_shard") == 2
    shutil.rmtree(tmp_path / "results", ignore_errors=True)


# Cheap backbones and tasks: the test is about which jobs rerun, not about the numbers.
SMALL_EVALUATION = {
    "datasets.synthetic.synthetic.n_patients": 10,
    "pretrain.enabled": False,
    "evaluation.backbones": {
        "handcrafted": {"kind": "handcrafted"},
        "random_init": {"kind": "random_init", "preset": "tiny", "seed": 0},
    },
    "evaluation.tasks": {
        "liver_volume": {"category": "regression", "labels": ["target"], "probes": ["ridge"]},
        "repeat_scan": {"category": "retrieval", "probes": ["gallery"]},
    },
    "evaluation.bootstrap": {"n_boot": 100},
}


@pytest.mark.slow
def test_task_change_reruns_only_its_probes(tmp_path):
    """Run ingestion, extraction, probes and the report for real; then changing one task's
    settings reruns that task's probe jobs and the report, and nothing else."""
    config = write_config(tmp_path, **SMALL_EVALUATION)
    result = run_snakemake("--cores", "2", "--configfile", str(config), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = tmp_path / "results" / "report"
    for name in ("results.csv", "results.md", "paired.csv", "overview.png"):
        assert (report / name).is_file(), name
    results = (report / "results.csv").read_text()
    assert "liver_volume" in results and "repeat_scan" in results

    unchanged = run_snakemake("-n", "--configfile", str(config))
    assert jobs_in_dry_run(unchanged.stdout) == {}, unchanged.stdout

    tasks = {**SMALL_EVALUATION["evaluation.tasks"]}
    tasks["liver_volume"] = {**tasks["liver_volume"], "features": "cls"}
    changed_config = write_config(tmp_path, **{**SMALL_EVALUATION, "evaluation.tasks": tasks})
    changed = run_snakemake("-n", "--configfile", str(changed_config))
    assert changed.returncode == 0, changed.stderr
    assert jobs_in_dry_run(changed.stdout) == {"all": 1, "probe": 2, "aggregate": 1}
    assert "repeat_scan" not in changed.stdout.split("rule aggregate")[0]
    shutil.rmtree(tmp_path / "results", ignore_errors=True)


def test_study_config_dry_runs_on_slurm_with_gpu_rules(tmp_path):
    """config/study.yaml: the paper's DAG against fake dataset roots, GPU rules on GPUs."""
    study_datasets = yaml.safe_load((REPO_ROOT / "config" / "study.yaml").read_text())["datasets"]
    for spec in study_datasets.values():  # the dry run checks that every dataset root exists
        Path(spec["adapter"]["root"].replace("$DATA", str(tmp_path / "data"))).mkdir(parents=True)
    result = run_snakemake(
        "-n",
        "--profile",
        "profiles/slurm",
        "--configfile",
        "config/study.yaml",
        "--config",
        f"results_dir={tmp_path / 'study'}",
        env={"DATA": str(tmp_path / "data")},
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = jobs_in_dry_run(result.stdout)
    study = yaml.safe_load((REPO_ROOT / "config" / "study.yaml").read_text())
    n_datasets, n_backbones = len(study["datasets"]), len(study["evaluation"]["backbones"])
    dense = {"localisation", "segmentation", "report_generation"}
    tasks = study["evaluation"]["tasks"]
    n_dense = sum(task["category"] in dense for task in tasks.values())
    assert jobs == {
        "all": 1,
        "adapt_dataset": n_datasets,
        "validate_manifest": n_datasets,
        "split_manifest": n_datasets,
        "preprocess_shard": n_datasets * study["preprocess"]["shards"],
        "summarize_dataset": n_datasets,
        "pretrain": 1,
        "export_teacher": 1,
        "embed": n_datasets * n_backbones * study["preprocess"]["shards"],
        "probe": (len(tasks) - n_dense) * n_backbones,
        "probe_dense": n_dense * n_backbones,
        "aggregate": 1,
    }
    blocks = result.stdout.split("\n\n")
    for rule, gpus in (("pretrain", 4), ("embed", 1), ("probe_dense", 1)):
        rule_blocks = [b for b in blocks if f"rule {rule}:" in b]
        assert rule_blocks and all(f"gpu={gpus}" in b for b in rule_blocks), rule
    assert not any("gpu=1" in b for b in blocks if "rule probe:" in b)
    assert "--root " + str(tmp_path / "data" / "CT-RATE") in result.stdout


def test_a_backbone_can_override_the_extraction_settings(tmp_path):
    backbones = {
        "handcrafted": {"kind": "handcrafted"},
        "whole_only": {"kind": "handcrafted", "bins": 16, "extraction": {"mode": "whole"}},
    }
    config = write_config(
        tmp_path, **{"pretrain.enabled": False, "evaluation.backbones": backbones}
    )
    result = run_snakemake("-n", "-p", "--configfile", str(config))
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if "voxelfm embed" in line]
    by_backbone = {c.split("--backbone ")[1].split()[0]: c for c in commands}
    assert "--mode auto" in by_backbone["handcrafted"]
    assert "--mode whole" in by_backbone["whole_only"]
    assert "extraction" not in by_backbone["whole_only"].split("--spec")[1].split("--out")[0]
