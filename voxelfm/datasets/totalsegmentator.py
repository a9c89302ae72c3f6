"""TotalSegmentator v2 dataset (Wasserthal et al. 2023; zenodo.org/records/10047292).

Layout expected under ``root`` (the unzipped Totalsegmentator_dataset_v201 folder)::

    meta.csv                       image_id;age;gender;institute;study_type;split;...
                                   (semicolon-separated; split is train / val / test)
    s0000/ct.nii.gz
    s0000/segmentations/liver.nii.gz, spleen.nii.gz, ...   (one binary mask per structure)

Produced:

- ``labels/<image_id>.nii.gz`` in ``out_dir``: one label map per scan on the CT's grid
  combining the chosen structures (option ``structures``, default ``DEFAULT_STRUCTURES``)
  as values 1..K in the order given (a later structure wins on overlap; the dataset's masks
  are disjoint). Written atomically; a map whose ``labels/<image_id>.json`` records the same
  structures and source checksum is reused. ``label_names.json``: value -> structure.
- manifest: ``image`` = ct.nii.gz, ``label_organs`` = the label map.
- labels: per structure ``<s>_x_mm`` / ``_y_mm`` / ``_z_mm`` (centroid in RAS world mm, from
  the nibabel affine; empty when the structure is absent) and ``<s>_volume_ml``; ``age``,
  ``gender``, ``study_type`` when meta.csv has them. Split: the official meta.csv split.

Each image_id is taken as its own patient (the release gives no patient id).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from voxelfm.datasets.common import (
    AdaptedDataset,
    absolute,
    as_list,
    centroid_columns,
    expected,
    label_statistics,
    read_table,
    safe_id,
    write_dataset,
)
from voxelfm.errors import InputError
from voxelfm.io.readers import sha256_of_files
from voxelfm.utils.atomic import atomic_path, atomic_write_text
from voxelfm.versions import ADAPTER_VERSIONS

NAME = "totalsegmentator"
VERSION = ADAPTER_VERSIONS["totalsegmentator"]  # bump it in voxelfm/versions.py
LABEL_MAP = "organs"
DEFAULT_STRUCTURES = (
    "liver",
    "spleen",
    "kidney_left",
    "kidney_right",
    "pancreas",
    "gallbladder",
    "stomach",
    "aorta",
)
_META_OPTIONAL = ("age", "gender", "study_type")
_GRID_TOLERANCE = 1e-3  # mm / direction cosines
_NIFTI_SCANNER_CODE = 1


def adapt(
    root: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    split_fractions: Sequence[float] | None = None,
    structures: str | Sequence[str] = DEFAULT_STRUCTURES,
) -> AdaptedDataset:
    """Write label maps, manifest, labels, label_names.json and dataset.json (docstring).

    seed and split_fractions are accepted for a uniform adapter signature but unused: the
    split is the dataset's official one.
    """
    root, out_dir = Path(root), Path(out_dir)
    structures = as_list(structures)
    if not structures or len(set(structures)) != len(structures):
        raise InputError(root, f"structures must be distinct names, got {structures}")
    if len(structures) > 255:
        raise InputError(root, "at most 255 structures fit a uint8 label map")
    meta = read_table(
        root / "meta.csv",
        ("image_id", "split"),
        "the TotalSegmentator meta table",
        "meta.csv with image_id;age;gender;institute;study_type;split",
        sep=";",
        dtype={"image_id": str},
    )
    meta["split"] = meta["split"].astype(str).str.strip().str.lower()
    unknown = sorted(set(meta["split"]) - {"train", "val", "test"})
    if unknown:
        raise InputError(root / "meta.csv", f"split values {unknown} are not train, val, test")

    records = []
    for row in meta.sort_values("image_id").itertuples(index=False):
        scan_id = safe_id(row.image_id, root / "meta.csv", "image_id")
        ct = root / scan_id / "ct.nii.gz"
        if not ct.is_file():
            continue  # listed but not on disk (a partial download)
        label_path = out_dir / "labels" / f"{scan_id}.nii.gz"
        label_map, affine = combine_masks(ct, structures, label_path)
        stats = label_statistics(label_map, affine, range(1, len(structures) + 1))
        record = {
            "scan_id": scan_id,
            "patient_id": scan_id,
            "image": absolute(ct),
            f"label_{LABEL_MAP}": f"labels/{scan_id}.nii.gz",
            "split": row.split,
        }
        for name in _META_OPTIONAL:
            if hasattr(row, name):
                record[name] = getattr(row, name)
        for value, structure in enumerate(structures, start=1):
            centre, volume = stats[value]
            for column, coordinate in zip(centroid_columns(structure), _or_nan(centre)):
                record[column] = coordinate
            record[f"{structure}_volume_ml"] = volume
        records.append(record)
    if not records:
        raise expected(root, "TotalSegmentator scans listed in meta.csv", "s0000/ct.nii.gz")
    labels = pd.DataFrame.from_records(records)
    manifest = labels[["scan_id", "patient_id", "image", f"label_{LABEL_MAP}"]]
    labels = labels.drop(columns=["image", f"label_{LABEL_MAP}"])
    classes = {value: name for value, name in enumerate(structures, start=1)}
    columns = {
        **{c: f"from meta.csv: {c}" for c in _META_OPTIONAL if c in labels},
        **{
            column: f"{axis} of the {s} centroid, RAS world mm (empty: absent)"
            for s in structures
            for axis, column in zip("xyz", centroid_columns(s))
        },
        **{f"{s}_volume_ml": f"volume of the {s} mask in ml" for s in structures},
    }
    tasks: dict[str, dict] = {
        "totalseg_organs": {
            "category": "segmentation",
            "probes": ["conv_decoder"],
            "options": {"label_map": LABEL_MAP, "classes": classes},
            "description": f"segment {', '.join(structures)}",
        },
        **{
            f"totalseg_{s}_centre": {
                "category": "localisation",
                "labels": centroid_columns(s),
                "probes": ["soft_argmax"],
                "options": {"hit_radius_mm": 20},
                "description": f"locate the {s} centroid",
            }
            for s in structures
        },
        f"totalseg_{structures[0]}_volume": {
            "category": "regression",
            "labels": [f"{structures[0]}_volume_ml"],
            "probes": ["ridge", "mlp"],
            "description": f"{structures[0]} volume in ml",
        },
    }
    label_names = {"0": "background", **{str(k): v for k, v in classes.items()}}
    return write_dataset(
        out_dir,
        name=NAME,
        version=VERSION,
        root=root,
        manifest=manifest,
        labels=labels,
        columns=columns,
        tasks=tasks,
        split_method="official meta.csv split (each image_id is its own patient)",
        extra={"label_maps": {LABEL_MAP: label_names}, "options": {"structures": structures}},
        extra_files={"label_names.json": json.dumps(label_names, indent=2) + "\n"},
    )


def combine_masks(
    ct: Path, structures: Sequence[str], label_path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The scan's combined label map (I, J, K) uint8 and its RAS affine, written if stale.

    Reuses ``label_path`` when its sidecar JSON records the same structures and the same
    SHA-256 of the source masks.
    """
    mask_dir = ct.parent / "segmentations"
    masks = [mask_dir / f"{s}.nii.gz" for s in structures]
    for mask in masks:
        if not mask.is_file():
            raise InputError(
                mask,
                "expected a mask per structure (e.g. s0000/segmentations/"
                "liver.nii.gz); check the structures option",
            )
    ct_image = nib.load(ct)
    checksum = sha256_of_files(masks)
    sidecar = label_path.with_name(label_path.name.replace(".nii.gz", ".json"))
    wanted = {"structures": list(structures), "source_sha256": checksum}
    if label_path.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()) == wanted:
                cached = nib.load(label_path)
                return np.asarray(cached.dataobj), cached.affine
        except (OSError, ValueError):
            pass  # unreadable cache: rebuild it
    shape = ct_image.shape[:3]
    combined = np.zeros(shape, dtype=np.uint8)
    for value, mask_path in enumerate(masks, start=1):
        mask = nib.load(mask_path)
        if mask.shape[:3] != shape or not np.allclose(
            mask.affine, ct_image.affine, atol=_GRID_TOLERANCE
        ):
            raise InputError(mask_path, f"mask grid differs from {ct} (shape or affine)")
        combined[np.asarray(mask.dataobj).reshape(shape) > 0] = value
    image = nib.Nifti1Image(combined, ct_image.affine)
    image.set_qform(ct_image.affine, code=_NIFTI_SCANNER_CODE)
    image.set_sform(ct_image.affine, code=_NIFTI_SCANNER_CODE)
    with atomic_path(label_path, suffix=".nii.gz") as tmp:
        nib.save(image, tmp)
    atomic_write_text(sidecar, json.dumps(wanted) + "\n")
    return combined, ct_image.affine


def _or_nan(centre) -> tuple[float, float, float]:
    return (np.nan, np.nan, np.nan) if centre is None else tuple(float(v) for v in centre)
