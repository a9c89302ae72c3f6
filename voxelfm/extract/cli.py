"""``voxelfm embed``: arguments and handler (registered by ``voxelfm.cli``).

Only argparse and json are imported at module level: ``voxelfm --help`` imports this file.

Example::

    voxelfm embed --stores results/demo/stores/shard_000.zarr \\
        --backbone voxelfm_demo \\
        --spec '{"kind": "voxelfm", "path": "results/demo/pretrain/teacher_backbone"}' \\
        --out results/demo/embeddings/voxelfm_demo/demo.zarr --mode auto --max-patches 4096
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _spec_arg(text: str) -> dict:
    """A JSON object, inline or in a ``.json`` file."""
    path = Path(text)
    if not text.lstrip().startswith("{") and path.suffix == ".json" and path.is_file():
        text = path.read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from err
    if not isinstance(config, dict):
        raise argparse.ArgumentTypeError(f"the backbone config must be a JSON object: {text!r}")
    return config


def _window_arg(text: str) -> int | tuple[int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 3:
        return tuple(parts)  # type: ignore[return-value]
    raise argparse.ArgumentTypeError(f"window must be N or NxNxN voxels, got {text!r}")


def add_embed_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--stores", nargs="+", required=True, help="Zarr shard stores to embed")
    cmd.add_argument("--backbone", required=True, help="backbone name recorded in the store")
    cmd.add_argument(
        "--spec",
        type=_spec_arg,
        required=True,
        help='backbone config JSON (or .json file), e.g. {"kind": "voxelfm", "path": DIR}',
    )
    cmd.add_argument("--out", required=True, help="embedding store to write (OUT.zarr)")
    cmd.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    cmd.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16 autocast on CUDA (CPU always runs fp32)",
    )
    cmd.add_argument("--batch-size", type=int, default=4, help="sliding windows per forward pass")
    cmd.add_argument(
        "--mode",
        choices=("auto", "whole", "sliding"),
        default="auto",
        help="auto slides windows over volumes above --max-patches, else one pass",
    )
    cmd.add_argument(
        "--window",
        type=_window_arg,
        default=None,
        help="sliding window edge in voxels (N or NxNxN; multiples of the patch size)",
    )
    cmd.add_argument("--overlap", type=float, default=0.5, help="window overlap fraction [0, 1)")
    cmd.add_argument(
        "--max-patches",
        type=int,
        default=None,
        help="patch budget per forward pass; auto mode slides above it",
    )
    cmd.add_argument("--no-patches", action="store_true", help="store only the global vectors")
    cmd.add_argument(
        "--allow-empty",
        action="store_true",
        help="stores without a complete scan give an empty embedding store, not an error "
        "(the workflow embeds each shard separately and reads the shards' stores as one)",
    )
    cmd.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_embed(args: argparse.Namespace) -> None:
    import torch

    from voxelfm.errors import VoxelFMError
    from voxelfm.extract.embed import embed_store
    from voxelfm.extract.store import EmbeddingStore

    if args.threads is not None:
        if args.threads < 1:
            raise VoxelFMError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        out = embed_store(
            args.stores,
            args.out,
            args.spec,
            name=args.backbone,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            mode=args.mode,
            window=args.window,
            overlap=args.overlap,
            max_patches=args.max_patches,
            store_patches=not args.no_patches,
            progress=not args.no_progress,
            allow_empty=args.allow_empty,
        )
    except ValueError as error:  # inconsistent extraction options
        raise VoxelFMError(str(error)) from error
    store = EmbeddingStore(out)
    failed = len(store.failed_scans)
    print(
        f"{len(store)} scans embedded with {store.backbone_name} "
        f"(D={store.embed_dim}{f', {failed} failed' if failed else ''}): {out}"
    )
