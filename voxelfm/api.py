"""The Python API: a backbone in one call, features of a scan in the next.

::

    import voxelfm

    backbone = voxelfm.load_backbone("results/demo/pretrain/teacher_backbone")
    features = backbone.embed("scan.nii.gz")   # or a DICOM folder, or an (X, Y, Z) HU array
    features.cls, features.pooled, features.patch, features.grid_affine

and for a whole folder (what ``voxelfm features`` runs)::

    result = voxelfm.features_from_folder("my_scans/", "my_features/")
    table = result.read_table()

``load_backbone`` takes the same backbone config a workflow config's ``evaluation.backbones`` entry takes (a
mapping, or its JSON text), or a short form: a ViT preset name (``tiny``, ``small``,
``base``: that architecture with random weights, a plumbing check), ``handcrafted`` (HU
statistics), an exported backbone folder (``voxelfm export``) or a published VoxelFM
checkpoint file (``.pth``/``.pt``). Torch is imported when a backbone is built, not when
``voxelfm`` is imported.

A preset name gives that architecture with random weights (seed 0) and LayerScale 0.1, the
value the demo pretrains with; the paper's 1e-5 would leave the random blocks inert.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voxelfm.errors import InputError, VoxelFMError

if TYPE_CHECKING:  # pragma: no cover - types only
    import numpy as np
    import pandas as pd

    from voxelfm.extract.extractor import Features
    from voxelfm.extract.interface import FeatureExtractor

# The extraction defaults of the workflow's config schema (evaluation.extraction).
DEFAULT_MAX_PATCHES = 4096
DEFAULT_OVERLAP = 0.5
CHECKPOINT_SUFFIXES = (".pth", ".pt")
# Names of what features_from_folder writes inside its output folder.
MANIFEST_FILE = "manifest.csv"
VOLUMES_STORE = "volumes.zarr"
TOKENS_STORE = "tokens.zarr"
FAILURES_FILE = "failures.csv"
QC_FILE = "qc.csv"
TABLE_STEM = "features"
RANDOM_PRESET_LAYERSCALE = 0.1


def backbone_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The full backbone config (a mapping with ``kind``) of itself or a short form (module docstring)."""
    if isinstance(config, Mapping):
        return dict(config)
    text = str(config).strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as error:
            raise VoxelFMError(f"backbone config is not valid JSON ({error}): {text}") from None
        if not isinstance(parsed, dict):
            raise VoxelFMError(f"backbone config must be a JSON object: {text}")
        return parsed
    from voxelfm.models.vision_transformer import VIT_PRESETS  # no torch at module level there

    if text in VIT_PRESETS:
        # LayerScale 0.1 rather than the paper's 1e-5: with 1e-5 a random ViT's blocks barely
        # act and its CLS vector is nearly the same for every scan (see random_init's warning).
        return {
            "kind": "random_init",
            "preset": text,
            "overrides": {"layerscale_init": RANDOM_PRESET_LAYERSCALE},
            "seed": 0,
            "name": f"random_{text}",
        }
    if text == "handcrafted":
        return {"kind": "handcrafted"}
    path = Path(text).expanduser()
    if path.is_dir():
        return {"kind": "voxelfm", "path": str(path)}
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        return {"kind": "published_voxelfm", "path": str(path)}
    if path.suffix == ".json" and path.is_file():
        return backbone_config(path.read_text())
    raise VoxelFMError(
        f"backbone {text!r} is neither a preset ({', '.join(sorted(VIT_PRESETS))}, "
        "handcrafted), an exported backbone folder, a .pth checkpoint, nor a JSON config"
    )


class Backbone:
    """A frozen backbone ready to embed scans (wraps a ``FeatureExtractor``).

    Attributes: ``name``, ``embed_dim``, ``patch_size`` (None for global-only backbones),
    ``spacing_mm`` (what the backbone expects, None = any), ``config`` and ``extractor``.
    """

    def __init__(self, extractor: FeatureExtractor):
        self.extractor = extractor

    name = property(lambda self: self.extractor.name)
    embed_dim = property(lambda self: int(self.extractor.embed_dim))
    patch_size = property(lambda self: self.extractor.patch_size)
    spacing_mm = property(lambda self: self.extractor.spacing_mm)
    config = property(lambda self: dict(self.extractor.config))

    def __repr__(self) -> str:
        return f"Backbone({self.extractor!r})"

    def embed(
        self,
        source: str | os.PathLike | np.ndarray | Any,
        *,
        spacing: Sequence[float] | None = None,
        origin: Sequence[float] | None = None,
        mode: str = "auto",
        max_patches: int | None = DEFAULT_MAX_PATCHES,
        window: int | Sequence[int] | None = None,
        overlap: float = DEFAULT_OVERLAP,
        batch_size: int = 4,
        series_uid: str | None = None,
    ) -> Features:
        """Embed one scan: a CT file or DICOM folder, or an (X, Y, Z) HU array.

        A file is read and preprocessed as ingestion does (canonical RAS, resampled to
        ``spacing``, default the backbone's else 1.5 mm, HU clipped). An array is taken as
        HU on the canonical RAS grid with ``spacing`` (default as above) and ``origin``
        (default 0) in mm. Volumes over ``max_patches`` patches run in overlapping sliding
        windows (``mode="whole"`` forces one pass).

        Returns ``voxelfm.extract.Features``: ``cls`` and ``pooled`` (D,), ``patch``
        (gx, gy, gz, D), ``grid_affine`` (token index -> RAS mm of the patch centre),
        ``token_centres()``, ``mode`` and ``n_windows``. InputError/VoxelFMError for input
        that cannot be used.
        """
        from voxelfm.extract.extractor import extract_features

        try:
            return extract_features(
                source,
                self.extractor,
                spacing=spacing,
                origin=origin,
                mode=mode,
                window=window,
                overlap=overlap,
                max_patches=max_patches,
                batch_size=batch_size,
                series_uid=series_uid,
            )
        except ValueError as error:  # inconsistent options: the user's to fix
            raise VoxelFMError(str(error)) from error


def load_backbone(
    config: str | os.PathLike | Mapping[str, Any] = "handcrafted",
    *,
    device: str = "auto",
    precision: str = "fp32",
) -> Backbone:
    """Build a backbone from its config or a short form (see the module docstring).

    device: "auto" (cuda when available), "cpu" or "cuda"; precision "bf16" autocasts on CUDA.
    """
    from voxelfm.extract.backbones import build_extractor

    return Backbone(build_extractor(backbone_config(config), device, precision=precision))


# --- cost estimate ---------------------------------------------------------------------


@dataclass
class CostEstimate:
    """What embedding a set of volumes will take, measured before it starts."""

    n_scans: int
    n_patches: int  # patch tokens over all scans
    n_windows: int  # forward passes (one per whole volume, one per sliding window)
    seconds_per_window: float  # measured here, for the largest window
    seconds: float  # rough total
    device: str

    def describe(self) -> str:
        return (
            f"cost estimate: {self.n_scans} scans, {self.n_patches:,} patch tokens in "
            f"{self.n_windows:,} forward passes; one of the largest takes "
            f"{self.seconds_per_window:.2f} s here -> about {_duration(self.seconds)} "
            f"on {self.device}"
        )


def window_plan(
    shape: Sequence[int],
    extractor: FeatureExtractor,
    *,
    mode: str = "auto",
    window: int | Sequence[int] | None = None,
    overlap: float = DEFAULT_OVERLAP,
    max_patches: int | None = DEFAULT_MAX_PATCHES,
) -> tuple[int, int, tuple[int, int, int]]:
    """(patch tokens, forward passes, voxels per pass) of one volume, as extraction runs it."""
    from voxelfm.extract.extractor import _window_patches, window_starts

    p = extractor.patch_size
    if p is None:
        return 0, 1, tuple(int(n) for n in shape)  # type: ignore[return-value]
    grid = tuple(math.ceil(int(n) / p) for n in shape)
    n_patches = math.prod(grid)
    if mode == "auto":
        mode = "sliding" if max_patches is not None and n_patches > max_patches else "whole"
    if mode == "whole":
        return n_patches, 1, tuple(g * p for g in grid)  # type: ignore[return-value]
    sizes = _window_patches(window, max_patches, p, grid)  # type: ignore[arg-type]
    strides = [max(1, round(w * (1 - overlap))) for w in sizes]  # as extractor._sliding
    passes = math.prod(len(window_starts(g, w, s)) for g, w, s in zip(grid, sizes, strides))
    return n_patches, passes, tuple(w * p for w in sizes)  # type: ignore[return-value]


def estimate_cost(
    shapes: Sequence[Sequence[int]],
    extractor: FeatureExtractor,
    **options: Any,
) -> CostEstimate:
    """Count patches and forward passes for ``shapes`` and time one of the largest passes."""
    import numpy as np
    import torch

    plans = [window_plan(shape, extractor, **options) for shape in shapes]
    largest = max((plan[2] for plan in plans), key=math.prod)
    rng = np.random.default_rng(0)
    probe = torch.from_numpy(rng.normal(0.0, 300.0, size=(1, 1, *largest)).astype(np.float32))
    extractor(probe[..., : min(8, largest[0]), : min(8, largest[1]), : min(8, largest[2])])
    start = time.perf_counter()
    extractor(probe)
    if extractor.device.type == "cuda":
        torch.cuda.synchronize()
    per_window = time.perf_counter() - start
    seconds = sum(
        passes * per_window * math.prod(voxels) / math.prod(largest) for _, passes, voxels in plans
    )
    threads = f" ({torch.get_num_threads()} threads)" if extractor.device.type == "cpu" else ""
    return CostEstimate(
        n_scans=len(plans),
        n_patches=sum(plan[0] for plan in plans),
        n_windows=sum(plan[1] for plan in plans),
        seconds_per_window=per_window,
        seconds=seconds,
        device=f"{extractor.device.type}{threads}",
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# --- a folder (or manifest) to a feature table ------------------------------------------


@dataclass
class FolderFeatures:
    """Where :func:`features_from_folder` wrote its outputs."""

    out_dir: Path
    table: Path  # features.parquet or features.csv: one row per embedded scan
    tokens: Path | None  # the embedding store (patch tokens with their world geometry)
    failures: Path  # scans without features, with the reason
    estimate: CostEstimate | None

    def read_table(self) -> pd.DataFrame:
        import pandas as pd

        if self.table.suffix == ".parquet":
            return pd.read_parquet(self.table)
        return pd.read_csv(self.table, dtype={"scan_id": str, "patient_id": str})


def table_format() -> str:
    """ "parquet" when pyarrow is installed, else "csv"."""
    import importlib.util

    return "parquet" if importlib.util.find_spec("pyarrow") is not None else "csv"


def features_from_folder(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    backbone: str | os.PathLike | Mapping[str, Any] = "handcrafted",
    device: str = "auto",
    precision: str = "fp32",
    spacing: Sequence[float] | None = None,
    include: Sequence[str] = (),
    mode: str = "auto",
    window: int | Sequence[int] | None = None,
    overlap: float = DEFAULT_OVERLAP,
    max_patches: int | None = DEFAULT_MAX_PATCHES,
    batch_size: int = 4,
    store_patches: bool = True,
    workers: int = 2,
    estimate_only: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> FolderFeatures:
    """Features of every scan in a folder (or a manifest), as a table and a token store.

    ``source``: a folder, searched recursively for NIfTI/NRRD/MetaImage files and DICOM
    series (``voxelfm.ingest.discover``; ``include`` globs narrow it), or a manifest
    CSV/TSV. Writes into ``out_dir``: ``manifest.csv`` (what was found), ``volumes.zarr``
    and ``qc.csv`` (the scans preprocessed as ingestion does: canonical RAS at ``spacing``,
    default the backbone's else 1.5 mm), ``tokens.zarr`` (the embedding store: CLS, pooled
    and, unless ``store_patches`` is False, patch tokens with their world geometry),
    ``features.parquet`` (``features.csv`` without pyarrow: scan_id, patient_id, source,
    mode, ``pooled_0..`` and ``cls_0..``) and ``failures.csv`` (scans without features and
    why). A rerun reuses the preprocessed scans whose source and settings are unchanged.
    With ``estimate_only``, stops after printing the cost estimate.
    """
    from voxelfm.conventions import DEFAULT_SPACING_MM
    from voxelfm.ingest.manifest import read_manifest
    from voxelfm.ingest.shards import run_shard
    from voxelfm.store import VolumeStore
    from voxelfm.utils.atomic import write_csv_atomically

    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise InputError(source, "does not exist")
    built = load_backbone(backbone, device=device, precision=precision).extractor
    try:  # options no volume could satisfy fail before any reading
        from voxelfm.extract.extractor import check_extraction_options

        check_extraction_options(
            built,
            mode=mode,
            window=window,
            overlap=overlap,
            max_patches=max_patches,
            batch_size=batch_size,
        )
    except ValueError as error:
        raise VoxelFMError(str(error)) from error
    target_spacing = tuple(float(s) for s in (spacing or built.spacing_mm or DEFAULT_SPACING_MM))
    out_dir.mkdir(parents=True, exist_ok=True)

    manifest_path = out_dir / MANIFEST_FILE
    if source.is_dir():
        from voxelfm.ingest.discover import scan_folder

        found = scan_folder(source, include=list(include), exclude=out_dir)
        for path, reason in found.skipped:
            log(f"skipped {path}: {reason}")
        write_csv_atomically(found.manifest, manifest_path)
    else:
        write_csv_atomically(read_manifest(source, strict=True), manifest_path)
    manifest = read_manifest(manifest_path, strict=True)
    log(f"{len(manifest)} scans found; preprocessing to {' x '.join(map(str, target_spacing))} mm")

    failures_path = out_dir / FAILURES_FILE
    run_shard(
        manifest_path,
        out_dir / VOLUMES_STORE,
        failures_path,
        out_dir / QC_FILE,
        spacing=target_spacing,
        workers=max(1, workers),
        progress=progress,
    )
    import pandas as pd

    ingest_failures = pd.read_csv(failures_path, dtype=str).fillna("")
    for row in ingest_failures.itertuples(index=False):
        log(f"not read: {row.scan_id} ({row.image}): {row.reason}")
    volumes = VolumeStore(out_dir / VOLUMES_STORE)
    scan_ids = [s for s in manifest["scan_id"] if s in volumes]
    if not scan_ids:
        raise VoxelFMError(f"no scan could be read; reasons in {failures_path}")
    options = {"mode": mode, "window": window, "overlap": overlap, "max_patches": max_patches}
    estimate = estimate_cost([volumes.shape(s) for s in scan_ids], built, **options)
    log(estimate.describe())
    table_path = out_dir / f"{TABLE_STEM}.{table_format()}"
    if estimate_only:
        return FolderFeatures(out_dir, table_path, None, failures_path, estimate)

    from voxelfm.extract.embed import embed_store
    from voxelfm.extract.store import EmbeddingStore

    tokens_path = embed_store(
        out_dir / VOLUMES_STORE,
        out_dir / TOKENS_STORE,
        built,
        batch_size=batch_size,
        scan_ids=scan_ids,
        store_patches=store_patches,
        progress=progress,
        **options,
    )
    tokens = EmbeddingStore(tokens_path)
    sources = dict(zip(manifest["scan_id"], manifest["image"]))
    table = feature_table(tokens, sources)
    if table_path.suffix == ".parquet":
        from voxelfm.utils.atomic import atomic_path

        with atomic_path(table_path, suffix=".parquet") as tmp:
            table.to_parquet(tmp, index=False)
    else:
        from voxelfm.utils.atomic import atomic_path

        with atomic_path(table_path, suffix=".csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.6g")
    embed_failures = pd.DataFrame(
        [
            {"scan_id": f["scan_id"], "image": sources.get(f["scan_id"], ""), "reason": f["error"]}
            for f in tokens.failed_scans
        ]
    )
    if len(embed_failures):
        for row in embed_failures.itertuples(index=False):
            log(f"not embedded: {row.scan_id}: {row.reason}")
        write_csv_atomically(
            pd.concat([ingest_failures, embed_failures], ignore_index=True).fillna(""),
            failures_path,
        )
    log(f"{len(table)} scans x {tokens.embed_dim} features ({built.name}): {table_path}")
    return FolderFeatures(out_dir, table_path, tokens_path, failures_path, estimate)


def feature_table(tokens: Any, sources: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per scan of an embedding store: ids, source, mode, pooled_* and cls_*."""
    import numpy as np
    import pandas as pd

    ids = tokens.scan_ids
    sources = sources or {}
    columns: dict[str, Any] = {
        "scan_id": ids,
        "patient_id": tokens.patient_ids,
        "source": [sources.get(scan_id, "") for scan_id in ids],
        "mode": tokens.attrs.get("modes", [""] * len(ids)),
    }
    for kind in ("pooled", "cls"):
        matrix = tokens.global_features(kind)
        columns.update({f"{kind}_{d}": matrix[:, d] for d in range(matrix.shape[1])})
    frame = pd.DataFrame(columns)
    float_columns = [c for c in frame.columns if c.startswith(("pooled_", "cls_"))]
    frame[float_columns] = frame[float_columns].astype(np.float32)
    return frame
