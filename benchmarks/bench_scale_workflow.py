"""How the workflow itself scales: the dry run of a 100,000-scan study, and a no-op rerun.

``dag``: ``config/study.yaml`` with its CT-RATE dataset given as a manifest of N scans
(100,000 by default; rows point at files that need not exist, the dry run never opens them)
in N / 100 preprocessing shards, its nine backbones and the tasks on that dataset (the other
five datasets dropped, so the job count is the one dataset's). Embedding is scattered, one
job per (backbone, dataset, shard). Times ``snakemake -n`` (parse, DAG, job list) at that
size and at a tenth of it, measured in the same run (the baseline of the ratio).

``noop``: a finished workflow rerun with nothing to do (``snakemake --cores 2``, no ``-n``),
local and with ``--profile profiles/slurm`` (whose executor plugin asks ``scontrol`` for the
cluster's configuration at start-up: run it with the cluster of
``voxelfm.devtools.slurm_cluster`` up, and once with it down), against ``snakemake
--version`` (interpreter and import start-up) in the same run. The finished workflow is the
tiny demo of ``profiles/slurm-dev/tiny_demo.yaml``, run first unless ``--results`` points at
a finished one.

    python benchmarks/bench_scale_workflow.py dag [--scans 100000] [--profile profiles/slurm]
    python benchmarks/bench_scale_workflow.py noop [--results /tmp/x/results]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TINY_DEMO = REPO / "profiles" / "slurm-dev" / "tiny_demo.yaml"
SCANS_PER_SHARD = 100


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall and CPU seconds of a command (on a shared machine the wall clock also counts
    other processes' time) and its result."""
    started, cpu = time.perf_counter(), cpu_seconds_of_children()
    result = subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, check=False
    )
    elapsed, cpu = time.perf_counter() - started, cpu_seconds_of_children() - cpu
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return elapsed, cpu, result


def job_count(output: str) -> int:
    match = re.search(r"^total\s+(\d+)$", output, flags=re.MULTILINE)
    return int(match.group(1)) if match else 0


def study_config(work: Path, scans: int) -> Path:
    """config/study.yaml with CT-RATE as a manifest of ``scans`` rows, alone."""
    manifest, labels = work / f"manifest_{scans}.csv", work / f"labels_{scans}.csv"
    images = work / "ct"
    images.mkdir(exist_ok=True)
    for i in range(scans):  # the workflow checks at parse time that every image exists
        (images / f"s{i:06d}.nii.gz").touch()
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["scan_id", "patient_id", "image"])
        writer.writerows(
            (f"s{i:06d}", f"p{i // 2:06d}", images / f"s{i:06d}.nii.gz") for i in range(scans)
        )
    study = yaml.safe_load((REPO / "config" / "study.yaml").read_text())
    columns = {c for task in study["evaluation"]["tasks"].values() for c in task.get("labels", [])}
    labels.write_text(",".join(["scan_id", "patient_id", "split", *sorted(columns)]) + "\n")
    study["results_dir"] = str(work / f"results_{scans}")
    study["datasets"] = {"ctrate": {"manifest": str(manifest), "labels": str(labels)}}
    study["preprocess"]["shards"] = max(1, scans // SCANS_PER_SHARD)
    study["evaluation"]["tasks"] = {
        name: task for name, task in study["evaluation"]["tasks"].items() if "dataset" not in task
    }
    path = work / f"study_{scans}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def bench_dag(args: argparse.Namespace) -> None:
    profile = ["--profile", args.profile] if args.profile else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scale_dag_") as tmp:
        for scans in (args.scans // 10, args.scans):
            config = study_config(Path(tmp), scans)
            wall, cpu, result = timed([*SNAKEMAKE, "-n", *profile, "--configfile", str(config)])
            embeds = len(re.findall(r"^rule embed:", result.stdout, flags=re.MULTILINE))
            rows.append((scans, job_count(result.stdout), embeds, wall, cpu))
    print(f"\nDry run of the study DAG ({args.profile or 'no profile'}), embedding per shard")
    print(f"{'scans':>8s} {'shards':>7s} {'jobs':>7s} {'embed':>7s} {'wall s':>7s} {'CPU s':>6s}")
    for scans, jobs, embeds, wall, cpu in rows:
        shards = scans // SCANS_PER_SHARD
        print(f"{scans:8d} {shards:7d} {jobs:7d} {embeds:7d} {wall:7.1f} {cpu:6.1f}")
    (_, jobs_small, _, wall_small, cpu_small), (_, jobs_big, _, wall_big, cpu_big) = rows
    print(
        f"{jobs_big / jobs_small:.1f}x the jobs take {wall_big / wall_small:.1f}x the wall time "
        f"({cpu_big / cpu_small:.1f}x the CPU); target < 60 s -> {wall_big:.1f} s "
        f"({cpu_big:.1f} CPU s)"
    )


def bench_noop(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_scale_noop_") as tmp:
        results = args.results or Path(tmp) / "results"
        config = ["--configfile", str(TINY_DEMO), "--config", f"results_dir={results}"]
        if args.results is None:
            print("running the tiny demo once (a few minutes) ...", flush=True)
            timed([*SNAKEMAKE, "--cores", "2", *config])
        cases = {
            "snakemake --version": [*SNAKEMAKE, "--version"],
            "no-op, local": [*SNAKEMAKE, "--cores", "2", *config],
            "no-op, --profile profiles/slurm": [
                *SNAKEMAKE, "--profile", "profiles/slurm", "--profile", "profiles/slurm-dev", *config
            ],
        }  # fmt: skip
        best = {}
        for name, command in cases.items():
            runs = [timed(command) for _ in range(args.repeats)]
            best[name] = min(run[:2] for run in runs)
            if name != "snakemake --version":
                assert "Nothing to be done" in runs[-1][2].stderr, runs[-1][2].stderr[-2000:]
    controller = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    state = " ".join(controller.stdout.split()) if controller.returncode == 0 else "no controller"
    print(f"\nNo-op rerun of the finished tiny demo (best of {args.repeats}; SLURM: {state})")
    base = best["snakemake --version"][0]
    for name, (wall, cpu) in best.items():
        print(f"{name:34s} {wall:6.2f} s (CPU {cpu:5.2f} s) {wall / base:5.1f}x start-up")
    local, slurm = best["no-op, local"][0], best["no-op, --profile profiles/slurm"][0]
    print(f"target < 5 s -> local {local:.2f} s, slurm profile {slurm:.2f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    dag = sub.add_parser("dag")
    dag.add_argument("--scans", type=int, default=100_000)
    dag.add_argument("--profile", help="e.g. profiles/slurm (default: none)")
    noop = sub.add_parser("noop")
    noop.add_argument("--results", type=Path, help="a finished tiny demo's results_dir")
    noop.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    bench_dag(args) if args.what == "dag" else bench_noop(args)


if __name__ == "__main__":
    main()
