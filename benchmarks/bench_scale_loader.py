"""Pretraining data loader throughput per worker, and the workers one H100 needs.

The paper's crop recipe (2 x 112^3 + 8 x 56^3 crops, the default ``voxelfm/configs/
ssl_default.yaml``) on volumes of a 1.5 mm CT (256 x 256 x 200 by default), through the real
loader (``voxelfm.ssl.data.build_ssl_dataloader``: crop planning, reads, resampling to the
crop sizes, flips, HU windows, collation and iBOT masks) with ``num_workers=0`` and one
thread, i.e. the work of one DataLoader worker, timed in CPU seconds of the process, from
two sources on the same volumes:

- *store*: the Zarr shard store (``VolumeStore.read_crops``: only the chunks the crops touch);
- *whole*: the reference's approach, one whole saved volume per sample (``torch.load`` of the
  volume's tensor, then the same crops cut from it).

Then the samples/s one H100 consumes: the ``base`` preset's model FLOPs per step
(``bench_training.step_flops``, masks counted from the loader's own batches) at 35% model
FLOP utilisation of 989 TFLOP/s bf16, and the workers needed = that / one worker's
samples/s. Warm page cache (the volumes were just written).

    python benchmarks/bench_scale_loader.py                       # synthetic volumes
    python benchmarks/bench_scale_loader.py --data-root ../shared/data --kind real
    python benchmarks/bench_scale_loader.py --quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import TARGET_MFU, StepShape, mean_masked_patches, step_flops
from ct_volumes import read_real_slices, synthetic_ct, tiled_real_ct

from voxelfm.models.vision_transformer import build_vit
from voxelfm.ssl.data import build_ssl_dataloader
from voxelfm.store import VolumeStore, write_scan
from voxelfm.train.config import resolve_ssl_config
from voxelfm.train.settings import SSLSettings
from voxelfm.volume import CanonicalVolume

H100_BF16_PEAK = 989e12


class WholeVolumeSource:
    """The reference's loader: every sample loads its scan's whole saved tensor."""

    def __init__(self, tensors: dict[str, Path], shapes: dict[str, tuple[int, int, int]]):
        self.tensors, self.shapes = tensors, shapes
        self.scan_ids = sorted(tensors)

    def shape(self, scan_id: str) -> tuple[int, int, int]:
        return self.shapes[scan_id]

    def read_crops(self, scan_id, crops):
        volume = torch.load(self.tensors[scan_id], weights_only=True).numpy()
        return [_cut(volume, start, size) for start, size in crops]

    def read_crop(self, scan_id, start, size):
        return self.read_crops(scan_id, [(start, size)])[0]


def _cut(volume: np.ndarray, start, size) -> np.ndarray:
    """The crop, padded with air where it leaves the volume (as the store's reader does)."""
    out = np.full(tuple(size), -1024, dtype=volume.dtype)
    src = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, size, volume.shape))
    dst = tuple(slice(r.start - s, r.stop - s) for r, s in zip(src, start))
    out[dst] = volume[src]
    return out


def samples_per_second(
    source, settings: SSLSettings, n_batches: int, batch: int
) -> tuple[float, list]:
    loader = build_ssl_dataloader(
        source,
        settings.crops,
        batch_size_per_rank=batch,
        num_workers=0,
        base_seed=0,
        patch_size=14,
        masking=settings.ibot.masking,
    )
    stream = iter(loader)
    batches = [next(stream)]  # warm-up: imports, handles, page cache
    times = []
    for _ in range(n_batches):
        # CPU time of this process: a worker is one core, and on a shared machine the wall
        # clock would count the other processes' time too.
        started = time.process_time()
        batches.append(next(stream))
        times.append(time.process_time() - started)
    return batch / statistics.median(times), batches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("synthetic", "real"), default="synthetic")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 200))
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per source")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per timed batch")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.volumes, args.batches, args.batch_size = (160, 160, 120), 3, 2, 2
    torch.set_num_threads(1)  # one worker = one core
    shape = tuple(args.shape)
    slices = read_real_slices(args.data_root) if args.kind == "real" else None
    config = resolve_ssl_config({})
    settings = SSLSettings.from_config(config)
    with tempfile.TemporaryDirectory(prefix="bench_scale_loader_") as tmp:
        work = Path(tmp)
        store_path, tensors = work / "shard_000.zarr", {}
        for index in range(args.volumes):
            image = (
                tiled_real_ct(slices, shape, index)
                if slices is not None
                else synthetic_ct(shape, index)
            )
            name = f"scan{index:03d}"
            write_scan(store_path, name, name, CanonicalVolume(image, (1.5,) * 3, (0.0,) * 3))
            tensors[name] = work / f"{name}.pt"
            torch.save(torch.from_numpy(image), tensors[name])
        sources = {
            "store": VolumeStore(store_path),
            "whole": WholeVolumeSource(tensors, dict.fromkeys(tensors, shape)),
        }
        rates, batches = {}, []
        for name, source in sources.items():
            rates[name], got = samples_per_second(source, settings, args.batches, args.batch_size)
            batches += got

    print(
        f"\nLoader, one worker: paper recipe (2x112^3 + 8x56^3), {args.volumes} {args.kind} "
        f"volumes of {'x'.join(map(str, shape))} (1.5 mm), {args.batches} batches of "
        f"{args.batch_size}, 1 thread"
    )
    print(f"{'source':8s} {'samples/s':>10s} {'CPU ms/sample':>14s} {'vs whole':>9s}")
    for name, rate in rates.items():
        print(f"{name:8s} {rate:10.2f} {1000 / rate:14.1f} {rate / rates['whole']:8.2f}x")

    backbone = build_vit("base")
    step = StepShape.from_config(config, backbone)
    masked = mean_masked_patches(batches) * step.batch_size / args.batch_size
    flops = step_flops(step, masked)["total"]
    steps_per_s = TARGET_MFU * H100_BF16_PEAK / flops
    need = steps_per_s * step.batch_size
    print(
        f"\nbase preset, batch {step.batch_size}/GPU: {flops / 1e12:.1f} TFLOP per step; at "
        f"{TARGET_MFU:.0%} MFU of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s one H100 runs "
        f"{steps_per_s:.2f} steps/s = {need:.1f} samples/s"
    )
    for name, rate in rates.items():
        print(f"workers per H100 ({name}): {need / rate:.1f} -> {math.ceil(need / rate)}")


if __name__ == "__main__":
    main()
