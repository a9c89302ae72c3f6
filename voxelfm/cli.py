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
    manifest = read_manifest(source)
    write_csv_atomically(manifest, args.out)
    print(f"{len(manifest)} scans of {manifest['patient_id'].nunique()} patients: {args.out}")


def _cmd_split(args: argparse.Namespace) -> None:
    from voxelfm.ingest.manifest import read_manifest
    from voxelfm.ingest.shards import split_manifest

    paths = split_manifest(read_manifest(args.manifest), args.shards, args.out_dir)
    print(f"{len(paths)} shards written to {args.out_dir}")


def _cmd_preprocess(args: argparse.Namespace) -> None:
    from voxelfm.ingest.shards import run_shard

    params = args.params
    run_shard(
        args.shard,
        args.store,
        failures_csv=args.failures,
        qc_csv=args.qc,
        spacing=tuple(params.get("spacing_mm", (1.5, 1.5, 1.5))),
        hu_range=tuple(params.get("hu_range", (-1024, 3071))),
        strict=bool(params.get("strict", False)),
        workers=args.workers,
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
    )


def _cmd_export(args: argparse.Namespace) -> None:
    from voxelfm.train.export import export_teacher_backbone

    export_teacher_backbone(args.run, args.out)


def _cmd_embed(args: argparse.Namespace) -> None:
    from voxelfm.extract.cli import run_embed

    run_embed(args)


def _cmd_probe(args: argparse.Namespace) -> None:
    from voxelfm.evaluation import BootstrapSettings, TaskSpec, read_label_table, run_task
    from voxelfm.evaluation.run import DenseContext
    from voxelfm.extract import EmbeddingStore

    task = TaskSpec.from_config(args.task_name, args.task)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxelfm", description="VoxelFM: CT preprocessing, pretraining and evaluation."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(handler=handler)
        return cmd

    cmd = add("synth", _cmd_synth, "Generate the synthetic demo cohort (NIfTI + DICOM + labels).")
    cmd.add_argument("--out", required=True, help="output folder (must not exist yet)")
    cmd.add_argument("--spec", type=_json_arg, default={}, help="JSON of generator parameters")

    cmd = add("manifest", _cmd_manifest, "Validate a manifest and write it with absolute paths.")
    cmd.add_argument("--source", required=True, help="manifest CSV/TSV, or a folder holding manifest.csv")
    cmd.add_argument("--out", required=True, help="validated manifest CSV to write")

    cmd = add("split", _cmd_split, "Split a validated manifest into preprocessing shards.")
    cmd.add_argument("--manifest", required=True)
    cmd.add_argument("--shards", type=int, required=True)
    cmd.add_argument("--out-dir", required=True)

    cmd = add("preprocess", _cmd_preprocess, "Preprocess one shard into a Zarr store.")
    cmd.add_argument("--shard", required=True, help="shard manifest CSV")
    cmd.add_argument("--store", required=True, help="output Zarr store folder")
    cmd.add_argument("--qc", required=True, help="output per-scan QC CSV")
    cmd.add_argument("--failures", required=True, help="output failures CSV")
    cmd.add_argument("--params", type=_json_arg, default={}, help="JSON of preprocess config")
    cmd.add_argument("--workers", type=int, default=1)

    cmd = add("summarize", _cmd_summarize, "Merge shard QC and failures; draw the mosaic.")
    cmd.add_argument("--stores", nargs="+", required=True)
    cmd.add_argument("--qc", nargs="+", required=True)
    cmd.add_argument("--failures", nargs="+", required=True)
    cmd.add_argument("--out-dir", required=True)

    cmd = add("pretrain", _cmd_pretrain, "Self-distillation pretraining (DINO + iBOT + KoLeo).")
    cmd.add_argument("--stores", nargs="+", required=True, help="Zarr shard stores to train on")
    cmd.add_argument("--out", required=True, help="run folder published when training ends")
    cmd.add_argument("--work-dir", required=True, help="checkpoints; a rerun resumes from here")
    cmd.add_argument("--overrides", type=_json_arg, default={}, help="JSON SSL-config overrides")
    cmd.add_argument("--gpus", type=int, default=0, help="GPUs (0 = CPU; >1 uses torchrun)")
    cmd.add_argument("--threads", type=int, default=2, help="CPU threads per process")

    cmd = add("export", _cmd_export, "Export the teacher backbone of a pretraining run.")
    cmd.add_argument("--run", required=True, help="pretraining run folder")
    cmd.add_argument("--out", required=True, help="backbone folder (safetensors + config)")

    from voxelfm.extract.cli import add_embed_arguments  # argparse only: cheap

    cmd = add("embed", _cmd_embed, "Extract frozen backbone features from shard stores.")
    add_embed_arguments(cmd)

    cmd = add("probe", _cmd_probe, "Fit and evaluate one task's probes on one embedding store.")
    cmd.add_argument("--embeddings", required=True, help="embedding store (voxelfm embed)")
    cmd.add_argument("--labels", required=True, help="label CSV, or a folder with labels.csv")
    cmd.add_argument("--task-name", required=True)
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

    cmd = add("report", _cmd_report, "Put every probe result side by side: tables and plots.")
    cmd.add_argument("--results", nargs="+", required=True, help="TASK=BACKBONE=FOLDER items")
    cmd.add_argument("--backbones", nargs="+", help="display order; the first is the reference")
    cmd.add_argument("--bootstrap", type=_json_arg, default={}, help="JSON bootstrap settings")
    cmd.add_argument("--out", required=True, help="report folder to write")

    cmd = add("adapt", _cmd_adapt, "Turn a public dataset's layout into manifest + labels.")
    cmd.add_argument("adapter", nargs="?", help="dataset adapter name (see --list)")
    cmd.add_argument("--list", action="store_true", help="list the adapters and their options")
    cmd.add_argument("--root", help="the dataset's folder, as downloaded")
    cmd.add_argument("--out", help="folder for manifest.csv, labels.csv, dataset.json")
    cmd.add_argument("--seed", type=int, default=0, help="seed of drawn splits")
    cmd.add_argument(
        "--option", action="append", default=[], help="KEY=VALUE adapter option (JSON or text)"
    )

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except VoxelFMError as err:
        print(f"voxelfm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
