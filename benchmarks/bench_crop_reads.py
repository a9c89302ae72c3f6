"""Multi-crop read throughput: the Zarr volume store vs whole-volume loading.

A "crop set" is what pretraining reads per sample: 2 global and 8 local crops of one
randomly chosen volume. Two recipes (``--recipe``):

  fixed    2 x 112^3 + 8 x 56^3 at uniformly random positions (the issue's recipe: the
           network input sizes read 1:1)
  sampler  the regions ``voxelfm.ssl.multicrop`` actually reads with the default recipe:
           cubes with side 0.32-1.0 (global) and 0.05-0.32 (local) of the volume's shortest
           side, later resampled to 112^3 / 56^3 (``MultiCropAugmentation.plan``)

Methods:

  store         VolumeStore.read_crops: the set in one call, each chunk decoded once
  store/crop    VolumeStore.read_crop once per crop (chunks shared by crops decoded again)
  store-none    read_crops on the same volumes stored uncompressed (same chunks)
  zarr-slicing  zarr's own ``array[slices]`` on a cached array handle, same store
  torch.load    torch.load of the whole saved int16 tensor, then slicing (reference loader)
  nifti         nibabel load of the whole .nii.gz, then slicing

Every method reads the same crops, in interleaved rounds (so load from other processes hits
all of them alike), single-threaded (torch and Blosc set to 1 thread), and after one warm-up
set; the table shows median milliseconds per set and ratios to the baselines of the same
run. Numbers are warm page cache: the files were written just before and the benchmark
volumes fit in memory. ``--sweep`` also times chunk shapes x compressors and their storage
ratio. Run ``--quick`` for a smoke test.

    python benchmarks/bench_crop_reads.py --data-root ../shared/data [--recipe sampler]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numcodecs.blosc
import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ct_volumes import FULL_SHAPE, benchmark_volumes

from voxelfm.ssl.multicrop import MultiCropAugmentation, MultiCropSettings
from voxelfm.store import (
    DEFAULT_CHUNKS,
    DEFAULT_COMPRESSOR_NAME,
    VolumeStore,
    make_compressor,
    write_scan,
)
from voxelfm.volume import CanonicalVolume

GLOBAL_CROP, LOCAL_CROP = 112, 56
CROP_SIZES = (GLOBAL_CROP,) * 2 + (LOCAL_CROP,) * 8
SWEEP_CHUNKS = (32, 64, 128)
SWEEP_COMPRESSORS = (
    "none",
    "zstd-1",
    "zstd-3",
    "zstd-9",
    "blosc-lz4-shuffle-5",
    "blosc-lz4-bitshuffle-5",
    "blosc-zstd-shuffle-1",
    "blosc-zstd-shuffle-3",
)


def crop_plan(
    rng: np.random.Generator, names: list[str], shapes: dict, n_sets: int, recipe: str = "fixed"
) -> list:
    """``n_sets`` crop sets: (volume name, [(start, size), ...]); see the module doc."""
    augmentation = MultiCropAugmentation(MultiCropSettings())
    plan = []
    for _ in range(n_sets):
        name = names[int(rng.integers(len(names)))]
        if recipe == "sampler":
            views = augmentation.plan(shapes[name], rng)
            crops = [(c.start, c.size) for c in views.global_crops + views.local_crops]
        else:
            crops = [
                (tuple(int(rng.integers(0, dim - size + 1)) for dim in shapes[name]), (size,) * 3)
                for size in CROP_SIZES
            ]
        plan.append((name, crops))
    return plan


def store_set_reader(store: VolumeStore) -> Callable:
    def read_set(name, crops):
        store.read_crops(name, crops)

    return read_set


def store_crop_reader(store: VolumeStore) -> Callable:
    def read_set(name, crops):
        for start, size in crops:
            store.read_crop(name, start, size)

    return read_set


def _inside(start, size, shape) -> tuple[slice, ...]:
    return tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, size, shape))


def zarr_slicing_reader(store_path: Path, names: list[str]) -> Callable:
    arrays = {name: zarr.open_array(store_path / name / "image", mode="r") for name in names}

    def read_set(name, crops):
        array = arrays[name]
        for start, size in crops:
            array[_inside(start, size, array.shape)]

    return read_set


def whole_volume_reader(load: Callable[[str], np.ndarray]) -> Callable:
    def read_set(name, crops):
        volume = load(name)
        for start, size in crops:
            np.array(volume[_inside(start, size, volume.shape)])

    return read_set


def time_methods(methods: dict[str, Callable], plans: dict[str, list]) -> dict[str, list[float]]:
    """Seconds per set for each method, interleaving methods round by round."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    rounds = max(len(plan) for plan in plans.values())
    for round_index in range(rounds):
        for name, read_set in methods.items():
            if round_index < len(plans[name]):
                volume, crops = plans[name][round_index]
                start = time.perf_counter()
                read_set(volume, crops)
                times[name].append(time.perf_counter() - start)
    return times


def write_formats(work: Path, volumes: dict[str, np.ndarray]) -> tuple[Path, Path, dict, dict]:
    """The volumes as one store (default layout), one uncompressed store, .nii.gz files and
    torch tensors."""
    store_path = work / "store" / "shard_000.zarr"
    raw_store_path = work / "store_none" / "shard_000.zarr"
    nifti, tensors = {}, {}
    for name, image in volumes.items():
        volume = CanonicalVolume(image, (1.0,) * 3, (0.0,) * 3)
        write_scan(store_path, name, name, volume)
        write_scan(raw_store_path, name, name, volume, compressor=make_compressor("none"))
        nifti[name] = work / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.eye(4)), nifti[name])
        tensors[name] = work / f"{name}.pt"
        torch.save(torch.from_numpy(image), tensors[name])
    return store_path, raw_store_path, nifti, tensors


def compare_loaders(args, work: Path, volumes: dict[str, np.ndarray]) -> None:
    store_path, raw_store_path, nifti, tensors = write_formats(work, volumes)
    names = sorted(volumes)
    shapes = {name: image.shape for name, image in volumes.items()}
    methods = {
        "store": store_set_reader(VolumeStore(store_path)),
        "store/crop": store_crop_reader(VolumeStore(store_path)),
        "store-none": store_set_reader(VolumeStore(raw_store_path)),
        "zarr-slicing": zarr_slicing_reader(store_path, names),
        "torch.load": whole_volume_reader(lambda n: torch.load(tensors[n]).numpy()),
        "nifti": whole_volume_reader(lambda n: np.asanyarray(nib.load(nifti[n]).dataobj)),
    }
    n_sets = dict.fromkeys(("store", "store/crop", "store-none"), args.sets)
    n_sets |= dict.fromkeys(("zarr-slicing", "torch.load", "nifti"), args.baseline_sets)
    # Same seed for every method: each reads the same crops of the same volumes.
    plans = {
        m: crop_plan(np.random.default_rng(args.seed), names, shapes, n, args.recipe)
        for m, n in n_sets.items()
    }
    for method, read_set in methods.items():  # warm the page cache and the handles
        read_set(*plans[method][0])
    times = time_methods(methods, plans)
    median_ms = {m: 1000 * statistics.median(t) for m, t in times.items()}
    shape_text = "x".join(map(str, args.shape))
    voxels = statistics.mean(
        sum(int(np.prod(size)) for _, size in crops) for _, crops in plans["store"]
    )
    recipe = (
        f"2x{GLOBAL_CROP}^3 + 8x{LOCAL_CROP}^3"
        if args.recipe == "fixed"
        else "multicrop sampler regions"
    )
    print(
        f"\nCrop sets ({recipe}, mean {voxels / 1e6:.1f} M voxels = "
        f"{voxels / np.prod(args.shape):.0%} of a volume), {len(volumes)} {args.kind} volumes "
        f"of {shape_text}, store {DEFAULT_CHUNKS[0]}^3 {DEFAULT_COMPRESSOR_NAME}, warm page cache"
    )
    print(
        f"{'method':14s} {'sets':>5s} {'ms/set':>9s} {'sets/s':>8s} {'vs torch.load':>14s} {'vs nifti':>9s}"
    )
    for method, ms in median_ms.items():
        print(
            f"{method:14s} {len(times[method]):5d} {ms:9.1f} {1000 / ms:8.1f} "
            f"{median_ms['torch.load'] / ms:13.1f}x {median_ms['nifti'] / ms:8.1f}x"
        )
    print(
        f"target: store >= 10x torch.load -> {median_ms['torch.load'] / median_ms['store']:.1f}x, "
        f">= 50x nifti -> {median_ms['nifti'] / median_ms['store']:.1f}x"
    )


def sweep(args, work: Path, volumes: dict[str, np.ndarray]) -> None:
    """Write every chunk x compressor layout, then time them in interleaved rounds."""
    volumes = dict(sorted(volumes.items())[: args.sweep_volumes])
    names = sorted(volumes)
    shapes = {name: image.shape for name, image in volumes.items()}
    raw_bytes = sum(image.nbytes for image in volumes.values())
    layouts = {}
    for chunk in args.sweep_chunks:
        for compressor_name in args.sweep_compressors:
            store_path = work / f"sweep_{chunk}_{compressor_name}.zarr"
            start = time.perf_counter()
            for name, image in volumes.items():
                volume = CanonicalVolume(image, (1.0,) * 3, (0.0,) * 3)
                write_scan(
                    store_path,
                    name,
                    name,
                    volume,
                    chunks=(chunk,) * 3,
                    compressor=make_compressor(compressor_name),
                )
            stored = sum(f.stat().st_size for f in store_path.rglob("*") if f.is_file())
            layouts[(chunk, compressor_name)] = {
                "store": VolumeStore(store_path),
                "write_s": (time.perf_counter() - start) / len(volumes),
                "ratio": raw_bytes / stored,
                GLOBAL_CROP: [],
                LOCAL_CROP: [],
            }
    plan = crop_plan(np.random.default_rng(args.seed), names, shapes, args.sweep_sets)
    for name, crops in plan:
        for layout in layouts.values():
            for start_voxel, size in crops:
                t0 = time.perf_counter()
                layout["store"].read_crop(name, start_voxel, size)
                layout[size[0]].append(time.perf_counter() - t0)
    print(
        f"\nChunk x compressor sweep: {len(volumes)} {args.kind} volumes of "
        f"{'x'.join(map(str, args.shape))}, one Zarr shard file per volume, warm cache, "
        f"median of {args.sweep_sets} interleaved sets"
    )
    print(
        f"{'chunks':>6s} {'compressor':24s} {'ratio':>6s} {'write s':>8s} "
        f"{'112^3 ms':>9s} {'56^3 ms':>8s} {'ms/set':>7s}"
    )
    for (chunk, compressor_name), layout in layouts.items():
        g = 1000 * statistics.median(layout[GLOBAL_CROP])
        loc = 1000 * statistics.median(layout[LOCAL_CROP])
        print(
            f"{chunk:6d} {compressor_name:24s} {layout['ratio']:6.2f} {layout['write_s']:8.2f} "
            f"{g:9.2f} {loc:8.2f} {2 * g + 8 * loc:7.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--kind", choices=("real", "synthetic"), default="real")
    parser.add_argument("--recipe", choices=("fixed", "sampler"), default="fixed")
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=FULL_SHAPE)
    parser.add_argument("--sets", type=int, default=60, help="crop sets timed for the store")
    parser.add_argument(
        "--baseline-sets", type=int, default=10, help="sets for zarr-slicing / torch.load / nifti"
    )
    parser.add_argument("--sweep", action="store_true", help="also time chunk x compressor choices")
    parser.add_argument("--sweep-only", action="store_true", help="skip the loader comparison")
    parser.add_argument("--sweep-sets", type=int, default=20)
    parser.add_argument("--sweep-volumes", type=int, default=2)
    parser.add_argument("--sweep-chunks", type=int, nargs="+", default=list(SWEEP_CHUNKS))
    parser.add_argument("--sweep-compressors", nargs="+", default=list(SWEEP_COMPRESSORS))
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="scratch folder (default: temp)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.shape = 2, (192, 192, 160)
        args.sets, args.baseline_sets, args.sweep_sets, args.sweep_volumes = 5, 2, 3, 1
    args.shape = tuple(args.shape)
    # Same threads for every method: one (the store, torch and nibabel read single-threaded).
    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    work = Path(tempfile.mkdtemp(prefix="voxelfm-bench-", dir=args.work_dir))
    try:
        volumes = dict(
            benchmark_volumes(args.kind, args.volumes, args.shape, args.data_root, args.seed)
        )
        if not args.sweep_only:
            compare_loaders(args, work, volumes)
        if args.sweep or args.sweep_only:
            sweep(args, work, volumes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
