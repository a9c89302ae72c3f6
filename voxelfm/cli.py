"""The ``voxelfm`` command-line tool: the entry point every Snakemake rule calls.

Each subcommand parses its arguments and calls one package function. Heavy modules (torch,
SimpleITK, zarr) are imported inside the handlers so ``voxelfm --help`` and the Snakefile stay
fast. A ``VoxelFMError`` is printed as one line and exits with status 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from voxelfm.errors import VoxelFMError

EXIT_USER_ERROR = 2


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from err


def _cmd_synth(args: argparse.Namespace) -> None:
    from voxelfm.synth import generate_cohort

    manifest = generate_cohort(args.out, **args.spec)
    print(f"synthetic cohort written: {manifest}")


def _cmd_manifest(args: argparse.Namespace) -> None:
    from voxelfm.ingest.manifest import read_manifest
    from voxelfm.utils.atomic import write_csv_atomically

    source = Path(args.source)
    if source.is_dir():
        source = source / "manifest.csv"
    # Every image and label map must exist: a typo found here costs seconds, found by the
    # preprocessing job it costs a shard's run and a line in failures.csv.
    manifest = read_manifest(source, strict=not args.allow_missing)
    if args.labels:
        from voxelfm.ingest.manifest import check_label_table

        for labels in args.labels:
            check_label_table(labels, manifest)
    write_csv_atomically(manifest, args.out)
    print(f"{len(manifest)} scans of {manifest['patient_id'].nunique()} patients: {args.out}")


def _cmd_split(args: argparse.Namespace) -> None:
    from voxelfm.ingest.manifest import read_manifest
    from voxelfm.ingest.shards import split_manifest

    paths = split_manifest(read_manifest(args.manifest), args.shards, args.out_dir)
    print(f"{len(paths)} shards written to {args.out_dir}")


def _cmd_preprocess(args: argparse.Namespace) -> None:
    from voxelfm.ingest.shards import run_shard
    from voxelfm.io.geometry import GeometryLimits

    params = args.params
    defaults = GeometryLimits()
    limits = GeometryLimits(
        min_spacing_mm=float(params.get("min_spacing_mm", defaults.min_spacing_mm)),
        max_spacing_mm=float(params.get("max_spacing_mm", defaults.max_spacing_mm)),
        max_voxels=int(params.get("max_voxels", defaults.max_voxels)),
    )
    run_shard(
        args.shard,
        args.store,
        failures_csv=args.failures,
        qc_csv=args.qc,
        spacing=tuple(params.get("spacing_mm", (1.5, 1.5, 1.5))),
        hu_range=tuple(params.get("hu_range", (-1024, 3071))),
        strict=bool(params.get("strict", False)),
        workers=args.workers,
        limits=limits,
    )


def _cmd_summarize(args: argparse.Namespace) -> None:
    from voxelfm.ingest.summary import summarize

    summarize(args.stores, args.qc, args.failures, args.out_dir)


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from voxelfm.train.launch import launch_pretraining

    launch_pretraining(
        stores=args.stores,
        out_dir=args.out,
        work_dir=args.work_dir,
        overrides=args.overrides,
        gpus=args.gpus,
        threads=args.threads,
        nodes=args.nodes,
    )


def _cmd_export(args: argparse.Namespace) -> None:
    from voxelfm.train.export import export_teacher_backbone

    export_teacher_backbone(args.run, args.out)


def _cmd_embed(args: argparse.Namespace) -> None:
    from voxelfm.extract.cli import run_embed

    run_embed(args)


def _cmd_probe(args: argparse.Namespace) -> None:
    from voxelfm.evaluation import BootstrapSettings, EvaluationTask, read_label_table, run_task
    from voxelfm.evaluation.results import DenseContext
    from voxelfm.extract import EmbeddingStore

    task = EvaluationTask.from_config(args.task_name, args.task)
    context = DenseContext()
    if args.volumes:
        from voxelfm.store import VolumeStore

        context.volumes = VolumeStore(args.volumes)
    if args.manifest:
        from voxelfm.ingest.manifest import read_manifest

        manifest = read_manifest(args.manifest)
        context.sources = dict(zip(manifest["scan_id"], manifest["image"]))
    out = run_task(
        EmbeddingStore(args.embeddings),
        read_label_table(args.labels),
        task,
        args.out,
        bootstrap=BootstrapSettings.from_config(args.bootstrap),
        labels_source=str(args.labels),
        context=context,
    )
    print(f"task {task.name} ({task.category}) evaluated: {out}")


def _cmd_report(args: argparse.Namespace) -> None:
    from voxelfm.evaluation import BootstrapSettings, aggregate

    results = {}
    for item in args.results:
        task, backbone, path = item.split("=", 2) if item.count("=") == 2 else (None, None, item)
        if task is None:
            raise VoxelFMError(f"--results items are TASK=BACKBONE=FOLDER, got {item!r}")
        results[(task, backbone)] = path
    out = aggregate(
        results,
        args.out,
        backbones=args.backbones,
        bootstrap=BootstrapSettings.from_config(args.bootstrap),
    )
    print(f"report written: {out}")


def _cmd_features(args: argparse.Namespace) -> None:
    from voxelfm.api import features_from_folder

    if args.threads is not None:
        if args.threads < 1:
            raise VoxelFMError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    features_from_folder(
        args.input,
        args.out,
        backbone=args.backbone,
        device=args.device,
        precision=args.precision,
        spacing=args.spacing,
        include=args.include,
        mode=args.mode,
        max_patches=None if args.max_patches == 0 else args.max_patches,
        batch_size=args.batch_size,
        store_patches=not args.no_patches,
        estimate_only=args.estimate_only,
        progress=not args.no_progress,
    )


def _spacing_arg(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"spacing is S or SX,SY,SZ mm (positive), got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def _cmd_adapt(args: argparse.Namespace) -> None:
    from voxelfm.datasets import ADAPTERS, adapt_dataset, adapter_options, adapter_summary

    if args.list:
        for name in ADAPTERS:
            options = ", ".join(f"{k}={v!r}" for k, v in adapter_options(name).items())
            print(f"{name}: {adapter_summary(name)}\n    options: {options}")
        return
    if not (args.adapter and args.root and args.out):
        raise VoxelFMError("adapt needs ADAPTER, --root and --out (or --list)")
    options = {"seed": args.seed}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VoxelFMError(f"--option items are KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)  # numbers, lists, mappings
        except json.JSONDecodeError:
            options[key.strip()] = value  # a plain string (e.g. structures=liver,spleen)
    dataset = adapt_dataset(args.adapter, args.root, args.out, **options)
    print(
        f"{dataset.name}: {dataset.n_scans} scans of {dataset.n_patients} patients, "
        f"{len(dataset.tasks)} suggested tasks: {dataset.out_dir}"
    )


def _cmd_install_profile(args: argparse.Namespace) -> None:
    from voxelfm.profiles import install_profile

    target = install_profile(args.name, args.dest, force=args.force)
    print(f"profile {args.name!r} installed: {target}")
    print(f"use it from the repository root as: snakemake --profile {args.name}")


def build_parser() -> argparse.ArgumentParser:
    import voxelfm

    parser = argparse.ArgumentParser(
        prog="voxelfm",
        description="VoxelFM: CT preprocessing, pretraining, feature extraction and evaluation.",
        epilog=_EPILOG_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"voxelfm {voxelfm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable, help_text: str, example: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog="example:\n  " + example.strip().replace("\n", "\n  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.set_defaults(handler=handler)
        return cmd

    cmd = add(
        "features",
        _cmd_features,
        "Features of every CT scan in a folder (or a manifest): a table plus the token store.",
        "voxelfm features my_scans/ --out my_features/ --backbone tiny --spacing 4\n"
        "# my_features/features.csv (features.parquet with pyarrow): scan_id, source,\n"
        "# pooled_0.., cls_0..; my_features/tokens.zarr: patch tokens with world geometry",
    )
    cmd.add_argument(
        "input",
        help="folder searched recursively for NIfTI/NRRD/MHA files and DICOM series, "
        "or a manifest CSV/TSV (scan_id, patient_id, image)",
    )
    cmd.add_argument("--out", required=True, help="output folder (created; reruns reuse it)")
    cmd.add_argument(
        "--backbone",
        default="handcrafted",
        help="a ViT preset (tiny, small, base: random weights), handcrafted (HU statistics, "
        "the default), an exported backbone folder, a published .pth checkpoint, or a "
        "JSON spec as in the config's evaluation.backbones",
    )
    cmd.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    cmd.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16 autocast on CUDA (CPU always runs fp32)",
    )
    cmd.add_argument(
        "--spacing",
        type=_spacing_arg,
        default=None,
        help="voxel size in mm the scans are resampled to: S or SX,SY,SZ (default: the "
        "backbone's, else 1.5); coarser is much cheaper on CPU",
    )
    cmd.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="keep only scans whose relative path or name matches (repeatable), "
        "e.g. 'ct.nii.gz' to leave label maps out",
    )
    cmd.add_argument(
        "--mode",
        choices=("auto", "whole", "sliding"),
        default="auto",
        help="auto slides windows over volumes above --max-patches, else one pass",
    )
    cmd.add_argument(
        "--max-patches",
        type=int,
        default=4096,
        help="patch budget of one forward pass (0 = unlimited); bounds memory",
    )
    cmd.add_argument("--batch-size", type=int, default=4, help="sliding windows per forward pass")
    cmd.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    cmd.add_argument(
        "--no-patches", action="store_true", help="keep only the global vectors (no token store)"
    )
    cmd.add_argument(
        "--estimate-only",
        action="store_true",
        help="find and preprocess the scans, print the cost estimate, and stop",
    )
    cmd.add_argument("--no-progress", action="store_true", help="no progress bars")

    cmd = add(
        "synth",
        _cmd_synth,
        "Generate the synthetic demo cohort (NIfTI + DICOM + labels).",
        'voxelfm synth --out /tmp/cohort --spec \'{"n_patients": 8, "seed": 0}\'',
    )
    cmd.add_argument("--out", required=True, help="output folder (must not exist yet)")
    cmd.add_argument(
        "--spec",
        type=_json_arg,
        default={},
        help="JSON of generator parameters (n_patients, seed, repeat_fraction, dicom_fraction)",
    )

    cmd = add(
        "manifest",
        _cmd_manifest,
        "Validate a manifest and write it with absolute paths.",
        "voxelfm manifest --source /data/mycohort/manifest.csv --out manifest.csv",
    )
    cmd.add_argument(
        "--source", required=True, help="manifest CSV/TSV, or a folder holding manifest.csv"
    )
    cmd.add_argument("--out", required=True, help="validated manifest CSV to write")
    cmd.add_argument(
        "--labels",
        nargs="*",
        default=[],
        help="label tables (CSV, or a folder with labels.csv) to check now: patients agree "
        "with the manifest and none has scans in two splits",
    )
    cmd.add_argument(
        "--allow-missing",
        action="store_true",
        help="accept image and label paths that do not exist (each becomes that scan's "
        "failure at preprocessing instead of an error here)",
    )

    cmd = add(
        "split",
        _cmd_split,
        "Split a validated manifest into preprocessing shards.",
        "voxelfm split --manifest manifest.csv --shards 4 --out-dir shards/",
    )
    cmd.add_argument("--manifest", required=True, help="validated manifest (voxelfm manifest)")
    cmd.add_argument(
        "--shards",
        type=int,
        required=True,
        help="number of shard manifests (a patient's scans stay in one shard)",
    )
    cmd.add_argument("--out-dir", required=True, help="folder for shard_NNN.csv files")

    cmd = add(
        "preprocess",
        _cmd_preprocess,
        "Preprocess one shard into a Zarr store.",
        "voxelfm preprocess --shard shards/shard_000.csv --store zarr/shard_000.zarr \\\n"
        "    --qc qc_000.csv --failures failures_000.csv --params '{\"spacing_mm\": [4, 4, 4]}'",
    )
    cmd.add_argument("--shard", required=True, help="shard manifest CSV")
    cmd.add_argument("--store", required=True, help="output Zarr store folder")
    cmd.add_argument("--qc", required=True, help="output per-scan QC CSV")
    cmd.add_argument("--failures", required=True, help="output failures CSV")
    cmd.add_argument(
        "--params",
        type=_json_arg,
        default={},
        help="JSON of preprocess config (spacing_mm, hu_range, strict)",
    )
    cmd.add_argument("--workers", type=int, default=1, help="scans preprocessed in parallel")

    cmd = add(
        "summarize",
        _cmd_summarize,
        "Merge shard QC and failures; draw the mosaic.",
        "voxelfm summarize --stores zarr/shard_*.zarr --qc qc_*.csv \\\n"
        "    --failures failures_*.csv --out-dir summary/",
    )
    cmd.add_argument("--stores", nargs="+", required=True, help="the shard Zarr stores")
    cmd.add_argument("--qc", nargs="+", required=True, help="the shards' QC CSVs")
    cmd.add_argument("--failures", nargs="+", required=True, help="the shards' failures CSVs")
    cmd.add_argument("--out-dir", required=True, help="folder for qc.csv, failures.csv, mosaic.png")

    cmd = add(
        "pretrain",
        _cmd_pretrain,
        "Self-distillation pretraining (DINO + iBOT + KoLeo).",
        "voxelfm pretrain --stores zarr/shard_000.zarr --out run/ --work-dir work/ \\\n"
        '    --overrides \'{"model": {"preset": "tiny"}}\'',
    )
    cmd.add_argument("--stores", nargs="+", required=True, help="Zarr shard stores to train on")
    cmd.add_argument("--out", required=True, help="run folder published when training ends")
    cmd.add_argument("--work-dir", required=True, help="checkpoints; a rerun resumes from here")
    cmd.add_argument("--overrides", type=_json_arg, default={}, help="JSON SSL-config overrides")
    cmd.add_argument("--gpus", type=int, default=0, help="GPUs (0 = CPU; >1 uses torchrun)")
    cmd.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="nodes of the SLURM job (>1: one torchrun per node through srun; --gpus is per node)",
    )
    cmd.add_argument("--threads", type=int, default=2, help="CPU threads per process")

    cmd = add(
        "export",
        _cmd_export,
        "Export the teacher backbone of a pretraining run.",
        "voxelfm export --run results/demo/pretrain/run --out teacher_backbone/",
    )
    cmd.add_argument("--run", required=True, help="pretraining run folder")
    cmd.add_argument("--out", required=True, help="backbone folder (safetensors + config)")

    from voxelfm.extract.cli import add_embed_arguments  # argparse only: cheap

    cmd = add(
        "embed",
        _cmd_embed,
        "Extract frozen backbone features from shard stores.",
        "voxelfm embed --stores zarr/shard_000.zarr --backbone voxelfm \\\n"
        '    --spec \'{"kind": "voxelfm", "path": "teacher_backbone"}\' --out emb.zarr',
    )
    add_embed_arguments(cmd)

    cmd = add(
        "probe",
        _cmd_probe,
        "Fit and evaluate one task's probes on one embedding store.",
        "voxelfm probe --embeddings emb.zarr --labels labels.csv --task-name lesion \\\n"
        '    --task \'{"category": "classification", "labels": ["finding"]}\' --out lesion/',
    )
    cmd.add_argument(
        "--embeddings",
        nargs="+",
        required=True,
        help="embedding store(s) (voxelfm embed); several (one per shard) are read as one",
    )
    cmd.add_argument("--labels", required=True, help="label CSV, or a folder with labels.csv")
    cmd.add_argument("--task-name", required=True, help="the task's name in the results")
    cmd.add_argument("--task", type=_json_arg, required=True, help="JSON task settings")
    cmd.add_argument("--bootstrap", type=_json_arg, default={}, help="JSON bootstrap settings")
    cmd.add_argument(
        "--volumes",
        nargs="+",
        help="shard stores with the scans and label maps (segmentation targets, figures)",
    )
    cmd.add_argument(
        "--manifest", help="validated manifest: predicted label maps are written back to its images"
    )
    cmd.add_argument("--out", required=True, help="result folder to write")

    cmd = add(
        "report",
        _cmd_report,
        "Put every probe result side by side: tables and plots.",
        "voxelfm report --results lesion=voxelfm=eval/lesion/voxelfm \\\n"
        "    lesion=handcrafted=eval/lesion/handcrafted --backbones voxelfm handcrafted --out report/",
    )
    cmd.add_argument("--results", nargs="+", required=True, help="TASK=BACKBONE=FOLDER items")
    cmd.add_argument("--backbones", nargs="+", help="display order; the first is the reference")
    cmd.add_argument("--bootstrap", type=_json_arg, default={}, help="JSON bootstrap settings")
    cmd.add_argument("--out", required=True, help="report folder to write")

    cmd = add(
        "adapt",
        _cmd_adapt,
        "Turn a public dataset's layout into manifest + labels.",
        "voxelfm adapt ctrate --root /data/CT-RATE --out adapted/ctrate\nvoxelfm adapt --list",
    )
    cmd.add_argument("adapter", nargs="?", help="dataset adapter name (see --list)")
    cmd.add_argument("--list", action="store_true", help="list the adapters and their options")
    cmd.add_argument("--root", help="the dataset's folder, as downloaded")
    cmd.add_argument("--out", help="folder for manifest.csv, labels.csv, dataset.json")
    cmd.add_argument("--seed", type=int, default=0, help="seed of drawn splits")
    cmd.add_argument(
        "--option", action="append", default=[], help="KEY=VALUE adapter option (JSON or text)"
    )

    cmd = add(
        "install-profile",
        _cmd_install_profile,
        "Copy a Snakemake profile of this repository (profiles/NAME) to where Snakemake "
        "looks for `--profile NAME` (~/.config/snakemake/NAME).",
        "voxelfm install-profile slurm    # then: snakemake --profile slurm",
    )
    cmd.add_argument("name", help="profile folder under profiles/, e.g. slurm")
    cmd.add_argument("--dest", help="profile search folder (default ~/.config/snakemake)")
    cmd.add_argument(
        "--force", action="store_true", help="replace a different existing copy (kept as .bak)"
    )

    return parser


_EPILOG_MAIN = """\
examples:
  voxelfm features my_scans/ --out my_features/ --backbone tiny   # a folder to a table
  snakemake --profile profiles/local                               # the whole demo study
  voxelfm COMMAND --help                                            # each command's options
"""


# Commands that run on a GPU when the job has one: a job given GPUs must find CUDA.
GPU_COMMANDS = ("pretrain", "embed", "probe")


def _check_allocated_gpus(args: argparse.Namespace) -> None:
    from voxelfm.utils.gpu import allocated_gpus, use_allocated_gpus

    if not hasattr(args, "gpus"):  # embed, probe: the device follows CUDA's availability
        use_allocated_gpus(args.command)
    elif use_allocated_gpus(args.command, args.gpus):
        # Every GPU SLURM gave this node (a multi-node job asks per node with `gres`).
        args.gpus = allocated_gpus(args.gpus)
    else:
        args.gpus = 0  # none asked for, or CPU fallback: train exactly as a CPU job would


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in GPU_COMMANDS:
            _check_allocated_gpus(args)
        args.handler(args)
    except VoxelFMError as err:
        print(f"voxelfm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
