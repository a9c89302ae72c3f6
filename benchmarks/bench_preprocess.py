"""Ingestion throughput and memory: run_shard vs a plain SimpleITK script.

Inputs are the real NIfTI CTs (OpenKBP head-and-neck, IBSI sarcoma), cycled when a run
needs more scans than exist. Two measurements:

1. Throughput (scans/min) on the same N scans, same number of worker threads:
   run_shard (read, canonicalise, resample to 1.5 mm, QC, fingerprint, Zarr write) vs
   a plain SimpleITK read -> resample to 1.5 mm (linear) -> write .nii.gz (or .mha).
   Both run in fresh processes with their imports done before the clock starts, with the
   inputs in the page cache (read once before), in ``--rounds`` interleaved rounds
   (alternating which goes first); the table shows the median. Target: run_shard not slower.
2. Peak RSS of a run_shard process for growing shard sizes (each in a fresh subprocess):
   dask keeps at most ``workers`` scans in flight, so memory must stay flat.

    python benchmarks/bench_preprocess.py --data-root ../shared/data [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from voxelfm.conventions import DEFAULT_SPACING_MM, HU_MAX, HU_MIN

_RSS_CHILD = """
import json, resource, sys, time
from voxelfm.ingest.shards import run_shard
import voxelfm.io.preprocess  # SimpleITK: imported before the clock, like the baseline's
manifest, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
report = run_shard(manifest, out + "/shard.zarr", out + "/failures.csv", out + "/qc.csv",
                   workers=workers, progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "failed": report.failed,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def real_inputs(data_root: Path) -> list[Path]:
    images = sorted(data_root.glob("openkbp/*/ct.nii.gz")) + sorted(
        data_root.glob("ibsi_sts/*/ct.nii.gz")
    )
    if not images:
        sys.exit(f"no real CT NIfTIs under {data_root}: pass --data-root")
    # Interleave the two collections so small runs see both kinds of scan.
    kbp = [p for p in images if "openkbp" in p.parts]
    sts = [p for p in images if "ibsi_sts" in p.parts]
    mixed = [p for pair in zip(kbp, sts) for p in pair]
    return mixed + kbp[len(sts) :] + sts[len(kbp) :]


def write_manifest(images: list[Path], count: int, path: Path) -> Path:
    rows = [
        {
            "scan_id": f"scan{n:04d}",
            "patient_id": f"p{n:04d}",
            "image": str(images[n % len(images)]),
        }
        for n in range(count)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def sitk_baseline(image_path: Path, out_path: Path) -> None:
    """Read, resample onto a 1.5 mm grid over the same extent (linear), clip, write."""
    image = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
    size = [
        round(n * s / t) for n, s, t in zip(image.GetSize(), image.GetSpacing(), DEFAULT_SPACING_MM)
    ]
    resampled = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        DEFAULT_SPACING_MM,
        image.GetDirection(),
        float(HU_MIN),
        sitk.sitkFloat32,
    )
    clipped = sitk.Clamp(resampled, sitk.sitkInt16, HU_MIN, HU_MAX)
    sitk.WriteImage(clipped, str(out_path), useCompression=out_path.suffix == ".gz")


def time_baseline(
    images: list[Path], count: int, out_dir: Path, workers: int, suffix: str
) -> float:
    out_dir.mkdir(parents=True)
    jobs = [(images[n % len(images)], out_dir / f"scan{n:04d}{suffix}") for n in range(count)]
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda job: sitk_baseline(*job), jobs))
    return time.perf_counter() - start


_BASELINE_CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from bench_preprocess import real_inputs, time_baseline
images = real_inputs(Path(sys.argv[2]))
seconds = time_baseline(images, int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
print(json.dumps({"seconds": seconds}))
"""


def baseline_child(data_root: Path, count: int, out_dir: Path, workers: int, suffix: str) -> float:
    """``time_baseline`` in a fresh process, like ``run_shard_child``."""
    here = str(Path(__file__).resolve().parent)
    command = [sys.executable, "-c", _BASELINE_CHILD, here, str(data_root), str(count)]
    command += [str(out_dir), str(workers), suffix]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def warm_page_cache(paths: list[Path]) -> None:
    for path in paths:
        path.read_bytes()


def run_shard_child(manifest: Path, out_dir: Path, workers: int) -> dict:
    out_dir.mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(manifest), str(out_dir), str(workers)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--scans", type=int, default=20, help="scans for the throughput comparison")
    parser.add_argument("--rss-sizes", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    parser.add_argument("--baseline-format", choices=(".nii.gz", ".mha"), default=".nii.gz")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.scans, args.rss_sizes, args.rounds = 4, [2, 6], 1
    images = real_inputs(args.data_root.resolve())  # the manifest needs absolute paths
    work = Path(tempfile.mkdtemp(prefix="voxelfm-bench-pre-", dir=args.work_dir))
    try:
        manifest = write_manifest(images, args.scans, work / "throughput.csv")
        warm_page_cache(images[: args.scans])
        seconds: dict[str, list[float]] = {"run_shard": [], "sitk": []}
        for round_index in range(args.rounds):
            order = ("sitk", "run_shard") if round_index % 2 == 0 else ("run_shard", "sitk")
            for method in order:
                out_dir = work / f"{method}_{round_index}"
                if method == "sitk":
                    seconds[method].append(
                        baseline_child(
                            args.data_root.resolve(),
                            args.scans,
                            out_dir,
                            args.workers,
                            args.baseline_format,
                        )
                    )
                else:
                    seconds[method].append(
                        run_shard_child(manifest, out_dir, args.workers)["seconds"]
                    )
                shutil.rmtree(out_dir, ignore_errors=True)
        median = {method: statistics.median(times) for method, times in seconds.items()}
        per_min = {method: 60 * args.scans / value for method, value in median.items()}
        print(
            f"\nPreprocessing {args.scans} real scans to 1.5 mm, {args.workers} worker threads, "
            f"median of {args.rounds} interleaved rounds"
        )
        print(f"{'method':34s} {'seconds':>8s} {'scans/min':>10s}  rounds (s)")
        labels = {
            "run_shard": "run_shard -> Zarr (+QC, checksums)",
            "sitk": "SimpleITK -> " + args.baseline_format,
        }
        for method, label in labels.items():
            rounds = " ".join(f"{value:.1f}" for value in seconds[method])
            print(f"{label:34s} {median[method]:8.1f} {per_min[method]:10.1f}  {rounds}")
        print(
            f"ratio run_shard / SimpleITK throughput: {per_min['run_shard'] / per_min['sitk']:.2f}x "
            "(target >= 1.0: not slower)"
        )

        print(f"\nPeak RSS of run_shard ({args.workers} workers) by shard size")
        print(f"{'scans':>6s} {'seconds':>8s} {'peak RSS MB':>12s}")
        peaks = []
        for size in args.rss_sizes:
            result = run_shard_child(
                write_manifest(images, size, work / f"rss_{size}.csv"),
                work / f"rss_{size}",
                args.workers,
            )
            peaks.append(result["peak_rss_mb"])
            print(f"{size:6d} {result['seconds']:8.1f} {result['peak_rss_mb']:12.0f}")
        print(
            f"ratio peak RSS largest / smallest shard: {peaks[-1] / peaks[0]:.2f}x (target ~1: flat)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
