"""Segmentation tasks: a convolutional decoder on frozen patch tokens, scored by Dice.

Task config (``evaluation.tasks.<name>``)::

    organs: {category: segmentation,
             options: {label_map: oars, classes: {1: brainstem, 2: spinal_cord}}}

The label maps come from the volume store (``DenseContext.volumes``), on the same canonical
grid the tokens were extracted from (checked scan by scan). Options:

* ``label_map`` (required): the label map's name in the volume store ("seg", "oars", ...);
* ``classes``: label value -> class name; other values are background. Default: every
  non-zero value present in the task's label maps, named by its value;
* ``epochs`` (30), ``steps_per_epoch`` (one crop per training scan), ``crop_tokens`` (8),
  ``batch_size`` (2), ``lr`` (1e-3), ``weight_decay`` (1e-4), ``width`` (64),
  ``device`` ("auto": CUDA when available);
* ``max_writeback`` (8): predicted test label maps written back to source space;
* ``n_figures`` (2): scans drawn in ``figures/``.

Metrics on test, each with a patient-level bootstrap interval: ``dice:<class>`` (mean over
the test scans where the class is in the truth or the prediction), ``dice_macro`` (per scan
the mean over such classes, then the mean over scans) and ``dice_micro`` (per scan the Dice
of the foreground voxels pooled over classes, then the mean over scans). A class absent from
both the truth and the prediction of a scan has no Dice there and is left out, never counted
as 1 (see ``voxelfm.probes.segmentation``).

Writes ``predictions.csv`` (every scan; the test scans with their per-scan Dice columns),
``selection.csv`` (per-epoch training loss and validation Dice), ``label_maps/<scan>.nii.gz``
(predicted test label maps in the source image's space, original label values) when
``DenseContext.sources`` knows the scan, and ``figures/*.png``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from voxelfm.errors import VoxelFMError
from voxelfm.evaluation.options import convert_options
from voxelfm.evaluation.results import PREDICTIONS_FILE, DenseContext, metric_rows, skipped_row
from voxelfm.splits import SPLIT_NAMES
from voxelfm.stats.bootstrap import bootstrap_metrics
from voxelfm.utils.jsonable import to_jsonable

PROBE = "conv_decoder"
DEFAULT_MAX_WRITEBACK = 8
_GEOMETRY_TOLERANCE = 1e-3  # mm
_OPTIONS = {
    "label_map": str,
    "classes": lambda v: v,
    "epochs": int,
    "steps_per_epoch": int,
    "crop_tokens": int,
    "batch_size": int,
    "lr": float,
    "weight_decay": float,
    "width": int,
    "device": str,
    "max_writeback": int,
    "n_figures": int,
}
_PROBE_OPTIONS = (
    "epochs",
    "steps_per_epoch",
    "crop_tokens",
    "batch_size",
    "lr",
    "weight_decay",
    "width",
)


def segmentation_options(task) -> dict[str, Any]:
    """The task's options, converted and checked (unknown keys are an error)."""
    options = convert_options(task, _OPTIONS, "segmentation")
    if not options.get("label_map"):
        raise VoxelFMError(f"task {task.name!r}: a segmentation task needs options.label_map")
    if "classes" in options:
        options["classes"] = _parse_classes(task.name, options["classes"])
    return options


def scans_with_label_map(task, data, context: DenseContext):
    """The task's data without (and reporting) the scans whose volume has no
    ``options.label_map``: a collection mixes cohorts, and only some are contoured for a
    given structure set."""
    volumes = context.volumes
    name = task.options.get("label_map")
    if volumes is None or name is None:
        return data  # the runner says what is missing
    has_map = np.array(
        [s in volumes and name in volumes.label_names(s) for s in data.rows["scan_id"]], bool
    )
    if has_map.all():
        return data
    dropped = dict(data.dropped)
    for scan_id in data.rows.loc[~has_map, "scan_id"]:
        dropped[scan_id] = f"no label map {name!r}"
    rows = data.rows[has_map].reset_index(drop=True)
    empty = [split for split in SPLIT_NAMES if not (rows["split"] == split).any()]
    if empty:
        raise VoxelFMError(
            f"task {task.name!r}: no scans with label map {name!r} in split(s) {empty}"
        )
    return dataclasses.replace(
        data, rows=rows, embedding_rows=data.embedding_rows[has_map], dropped=dropped
    )


def _parse_classes(task_name: str, classes: Any) -> dict[int, str]:
    if not isinstance(classes, Mapping) or not classes:
        raise VoxelFMError(f"task {task_name!r}: classes must map label values to names")
    try:
        parsed = {int(value): str(name) for value, name in classes.items()}
    except (TypeError, ValueError):
        raise VoxelFMError(f"task {task_name!r}: class label values must be integers") from None
    if any(value <= 0 for value in parsed):
        raise VoxelFMError(f"task {task_name!r}: class values must be positive (0 = background)")
    if len(set(parsed.values())) != len(parsed):
        raise VoxelFMError(f"task {task_name!r}: class names must be distinct")
    return dict(sorted(parsed.items()))


def check_token_alignment(
    scan_id: str, geometry: Mapping[str, Any], attrs: Mapping[str, Any], shape, patch_size: int
) -> None:
    """Raise unless token (i, j, k) covers voxels [i*p, (i+1)*p)... of the stored volume.

    ``geometry``: the embedding store's patch attributes of the scan; ``attrs``/``shape``:
    the volume store's. A mismatch means the tokens were extracted from another grid (other
    spacing, another preprocessing run), and pairing them with this label map would train
    on misaligned targets.
    """
    spacing = np.asarray(attrs["spacing"], dtype=float)
    origin = np.asarray(attrs["origin"], dtype=float)
    affine = np.asarray(geometry["grid_affine"], dtype=float)
    problems = []
    if tuple(geometry.get("volume_shape", shape)) != tuple(shape):
        problems.append(f"token volume {tuple(geometry['volume_shape'])} vs stored {tuple(shape)}")
    if not np.allclose(geometry.get("spacing", spacing), spacing, atol=_GEOMETRY_TOLERANCE):
        problems.append(f"token spacing {geometry['spacing']} vs stored {spacing.tolist()}")
    if not np.allclose(np.diag(affine)[:3], spacing * patch_size, atol=_GEOMETRY_TOLERANCE):
        problems.append("token step is not patch_size voxels")
    first_voxel = (affine[:3, 3] - origin) / spacing - (patch_size - 1) / 2
    if not np.allclose(first_voxel, 0, atol=_GEOMETRY_TOLERANCE) or not np.allclose(
        affine[:3, :3], np.diag(np.diag(affine)[:3])
    ):
        problems.append(f"token (0, 0, 0) does not start at voxel 0 (at {first_voxel.round(3)})")
    if problems:
        raise VoxelFMError(
            f"scan {scan_id}: patch tokens do not line up with the volume store: "
            + "; ".join(problems)
        )


def _value_lookup(classes: Mapping[int, str], max_value: int) -> np.ndarray:
    """Label value -> class index (1..C in the order of ``classes``; 0 for the rest)."""
    lookup = np.zeros(max(max_value, max(classes)) + 1, dtype=np.uint8)
    for index, value in enumerate(classes, start=1):
        lookup[value] = index
    return lookup


def run_segmentation(task, data, embeddings, bootstrap, out: Path, context) -> pd.DataFrame:
    """Fit the decoder on train (epoch chosen on val Dice), evaluate once on test."""
    # The probe module imports torch: only when a segmentation task runs.
    from voxelfm.probes.segmentation import (
        SegmentationScan,
        confusion_counts,
        dice_macro,
        dice_micro,
        dice_per_class,
        fit_select_conv_decoder,
    )

    options = segmentation_options(task)
    rows = data.rows
    predictions = rows.copy()
    if PROBE not in task.probes:
        predictions.to_csv(out / PREDICTIONS_FILE, index=False)
        return pd.DataFrame([skipped_row(p, "not a segmentation probe") for p in task.probes])
    volumes = getattr(context, "volumes", None)
    if volumes is None:
        raise VoxelFMError(
            f"task {task.name!r}: segmentation needs the volume store holding the label maps"
        )
    if not all(embeddings.has_patch_tokens(scan_id) for scan_id in rows.scan_id):
        predictions.to_csv(out / PREDICTIONS_FILE, index=False)
        return pd.DataFrame([skipped_row(PROBE, "the backbone has no patch tokens")])
    patch_size = embeddings.patch_size
    if not isinstance(patch_size, int) or patch_size < 1:
        raise VoxelFMError(f"{embeddings.path}: the embedding store has no integer patch_size")

    label_name = options["label_map"]
    raw_labels = {}
    for scan_id in rows.scan_id:
        if scan_id not in volumes:
            raise VoxelFMError(f"task {task.name!r}: scan {scan_id} is not in the volume store")
        if label_name not in volumes.label_names(scan_id):
            raise VoxelFMError(
                f"task {task.name!r}: scan {scan_id} has no label map {label_name!r} "
                f"(it has {volumes.label_names(scan_id)})"
            )
        check_token_alignment(
            scan_id,
            embeddings.patch_geometry(scan_id),
            volumes.attrs(scan_id),
            volumes.shape(scan_id),
            patch_size,
        )
        raw_labels[scan_id] = volumes.read_label(scan_id, label_name)
    max_value = max(int(labels.max(initial=0)) for labels in raw_labels.values())
    classes = options.get("classes") or {
        int(v): str(int(v))
        for v in np.unique(np.concatenate([np.unique(x) for x in raw_labels.values()]))
        if v > 0
    }
    if not classes:
        raise VoxelFMError(f"task {task.name!r}: label map {label_name!r} is empty in every scan")
    lookup = _value_lookup(classes, max_value)
    class_values = np.array([0, *classes], dtype=np.int64)  # class index -> label value
    class_names = list(classes.values())
    n_classes = len(classes) + 1

    def scans(split: str) -> list:
        return [
            SegmentationScan(embeddings.patch_tokens(s)[0], lookup[raw_labels[s]])
            for s in rows.loc[data.split_mask(split), "scan_id"]
        ]

    probe_options = {key: options[key] for key in _PROBE_OPTIONS if key in options}
    segmenter = fit_select_conv_decoder(
        scans("train"),
        scans("val"),
        n_classes,
        patch_size,
        device=_device(options.get("device", "auto")),
        seed=task.seed,
        **probe_options,
    )
    pd.DataFrame(segmenter.selection_trace).to_csv(out / "selection.csv", index=False)

    test = data.split_mask("test")
    test_ids = rows.loc[test, "scan_id"].tolist()
    per_scan = np.full((len(test_ids), len(classes) + 2), np.nan)  # classes, macro, micro
    max_writeback = options.get("max_writeback", DEFAULT_MAX_WRITEBACK)
    n_figures = options.get("n_figures", 2)
    written = 0
    for row, scan_id in enumerate(test_ids):
        tokens, _ = embeddings.patch_tokens(scan_id)
        truth = lookup[raw_labels[scan_id]]
        predicted = segmenter.predict(tokens, truth.shape)
        confusion = confusion_counts(truth, predicted, n_classes)
        per_scan[row] = [*dice_per_class(confusion), dice_macro(confusion), dice_micro(confusion)]
        if scan_id in context.sources and written < max_writeback:
            _write_back(out, scan_id, class_values[predicted], volumes, context.sources[scan_id])
            written += 1
        if row < n_figures:
            _write_figures(
                out / "figures", scan_id, volumes, tokens, patch_size, truth, predicted, class_names
            )

    names = [f"dice:{name}" for name in class_names] + ["dice_macro", "dice_micro"]
    scan_dice = pd.DataFrame(per_scan, columns=names)
    scan_dice.insert(0, "scan_id", test_ids)
    predictions = predictions.merge(scan_dice, on="scan_id", how="left")
    predictions.to_csv(out / PREDICTIONS_FILE, index=False)

    test_patients = rows.loc[test, "patient_id"].to_numpy()
    intervals = bootstrap_metrics(
        {name: _column_nanmean(j) for j, name in enumerate(names)},
        per_scan,
        per_scan,
        test_patients,
        n_boot=bootstrap.n_boot,
        seed=bootstrap.seed,
        confidence=bootstrap.confidence,
    )
    n_scored = np.isfinite(per_scan[:, : len(classes)]).sum(0)
    note = "scans scored per class: " + ", ".join(
        f"{name} {int(n)}" for name, n in zip(class_names, n_scored)
    )
    return pd.DataFrame(
        metric_rows(
            PROBE,
            intervals,
            n_test_scans=int(test.sum()),
            n_test_patients=len(np.unique(test_patients)),
            validation_score=segmenter.validation_score,
            hyperparameters=json.dumps(
                to_jsonable({**segmenter.hyperparameters, "classes": classes})
            ),
            note=note + (f"; {written} label map(s) written back" if written else ""),
        )
    )


def _column_nanmean(column: int):
    """Metric (per-scan values, _) -> mean of one column over the scans where it is defined."""
    from voxelfm.probes.segmentation import nanmean  # imports torch

    return lambda values, _: float(nanmean(values[:, column]))


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise VoxelFMError(f"segmentation device must be auto, cpu or cuda, got {name!r}")
    return name


def _write_back(out: Path, scan_id: str, labels: np.ndarray, volumes, source) -> None:
    from voxelfm.io.writeback import write_label_map_to_source  # SimpleITK

    attrs = volumes.attrs(scan_id)
    write_label_map_to_source(
        labels,
        attrs["spacing"],
        attrs["origin"],
        source,
        out / "label_maps" / f"{scan_id}.nii.gz",
    )


def _write_figures(
    folder: Path, scan_id, volumes, tokens, patch_size, truth, predicted, class_names
) -> None:
    # matplotlib: only when figures are drawn.
    from voxelfm.evaluation.feature_maps import pca_feature_map_figure, segmentation_overlay_figure

    folder.mkdir(parents=True, exist_ok=True)
    attrs = volumes.attrs(scan_id)
    image = volumes.read_volume(scan_id)
    pca_feature_map_figure(
        image,
        attrs["spacing"],
        tokens,
        patch_size=patch_size,
        origin=attrs["origin"],
        title=f"{scan_id}: patch-token PCA",
    ).savefig(folder / f"pca_{scan_id}.png", dpi=100)
    segmentation_overlay_figure(
        image,
        attrs["spacing"],
        truth,
        predicted,
        class_names,
        origin=attrs["origin"],
        title=f"{scan_id}: segmentation",
    ).savefig(folder / f"segmentation_{scan_id}.png", dpi=100)
