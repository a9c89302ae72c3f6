"""Localisation tasks: predict a structure's centre (RAS world mm) from frozen patch tokens.

Task config (``evaluation.tasks.<name>``)::

    lesion: {category: localisation, labels: [lesion_x_mm, lesion_y_mm, lesion_z_mm],
             options: {hit_radius_mm: 20}}

The three label columns are the structure's centre in the canonical RAS world (the frame of
the volume store and of the tokens' ``grid_affine``). Options (all optional):
``hit_radius_mm`` (20), ``lrs`` ([1e-3, 3e-3]), ``weight_decays`` ([1e-4, 1e-2]),
``hidden_dim`` (64), ``learn_offset`` (true), ``max_epochs`` (200), ``patience`` (20),
``batch_size`` (8), ``n_figures`` (2).

Writes, besides the metric rows (``mean_error_mm``, ``median_error_mm``,
``hit_rate@<r>mm`` with patient-level bootstrap intervals on test):

* ``predictions.csv``: every scan with its split, the true position, the predicted one
  (``score:soft_argmax:0..2`` = x, y, z mm, readable with ``results.score_matrix``), the error
  (``error_mm:soft_argmax``) and whether it is a hit (``hit:soft_argmax``);
* ``selection.csv``: validation error of every (lr, weight decay) tried;
* ``figures/``: PCA maps of the patch tokens and the true / predicted points on the first
  test scans (when the volume store is given).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from voxelfm.errors import VoxelFMError
from voxelfm.evaluation.options import convert_options, float_tuple
from voxelfm.evaluation.results import PREDICTIONS_FILE, metric_rows, skipped_row
from voxelfm.stats.bootstrap import bootstrap_metrics
from voxelfm.utils.jsonable import to_jsonable

PROBE = "soft_argmax"
DEFAULT_HIT_RADIUS_MM = 20.0
_OPTIONS = {
    "hit_radius_mm": float,
    "lrs": float_tuple,
    "weight_decays": float_tuple,
    "hidden_dim": int,
    "learn_offset": bool,
    "max_epochs": int,
    "patience": int,
    "batch_size": int,
    "n_figures": int,
}


def localisation_options(task) -> dict[str, Any]:
    """The task's options, converted and checked (unknown keys are an error)."""
    options = convert_options(task, _OPTIONS, "localisation")
    options.setdefault("hit_radius_mm", DEFAULT_HIT_RADIUS_MM)
    if options["hit_radius_mm"] <= 0:
        raise VoxelFMError(f"task {task.name!r}: hit_radius_mm must be positive")
    return options


def run_localisation(task, data, embeddings, bootstrap, out: Path, context) -> pd.DataFrame:
    """Fit the soft-argmax probe on train (chosen on val), evaluate once on test.

    Returns the metric rows (``results.metric_rows``); writes predictions.csv, selection.csv and
    figures into ``out`` (see the module docstring).
    """
    # The probe module imports torch: only when a localisation task runs.
    from voxelfm.probes.localisation import (
        TokenGrids,
        euclidean_errors_mm,
        fit_select_soft_argmax,
    )

    options = localisation_options(task)
    radius = options.pop("hit_radius_mm")
    n_figures = options.pop("n_figures", 2)
    rows = data.rows
    predictions = rows.copy()
    if PROBE not in task.probes:
        predictions.to_csv(out / PREDICTIONS_FILE, index=False)
        return pd.DataFrame([skipped_row(p, "not a localisation probe") for p in task.probes])
    if not all(embeddings.has_patch_tokens(scan_id) for scan_id in rows.scan_id):
        predictions.to_csv(out / PREDICTIONS_FILE, index=False)
        return pd.DataFrame([skipped_row(PROBE, "the backbone has no patch tokens")])

    grids = [embeddings.patch_tokens(scan_id) for scan_id in rows.scan_id]
    y = rows[list(task.labels)].to_numpy(dtype=np.float64)  # (n, 3) RAS mm
    masks = {split: data.split_mask(split) for split in ("train", "val", "test")}
    outside = _points_outside_grids(grids, y)

    def subset(split: str) -> TokenGrids:
        return TokenGrids.from_arrays(
            [grid for grid, keep in zip(grids, masks[split]) if keep], split
        )

    probe = fit_select_soft_argmax(
        subset("train"),
        y[masks["train"]],
        subset("val"),
        y[masks["val"]],
        seed=task.seed,
        **options,
    )
    predicted = probe.predict(TokenGrids.from_arrays(grids, "all scans"))  # (n, 3)
    errors = euclidean_errors_mm(y, predicted)
    for axis in range(3):
        predictions[f"score:{PROBE}:{axis}"] = predicted[:, axis]
    predictions[f"error_mm:{PROBE}"] = errors
    predictions[f"hit:{PROBE}"] = errors <= radius
    predictions.to_csv(out / PREDICTIONS_FILE, index=False)
    pd.DataFrame(probe.selection_trace).to_csv(out / "selection.csv", index=False)

    test = masks["test"]
    test_patients = rows.loc[test, "patient_id"].to_numpy()
    intervals = bootstrap_metrics(
        {
            "mean_error_mm": lambda e, _: float(np.mean(e)),
            "median_error_mm": lambda e, _: float(np.median(e)),
            f"hit_rate@{radius:g}mm": lambda e, _: float(np.mean(e <= radius)),
        },
        errors[test],
        errors[test],
        test_patients,
        n_boot=bootstrap.n_boot,
        seed=bootstrap.seed,
        confidence=bootstrap.confidence,
    )
    # Chance level: always answering the mean training position.
    baseline = euclidean_errors_mm(
        y[test], np.broadcast_to(y[masks["train"]].mean(0), y[test].shape)
    )
    note = f"train-mean-position baseline: mean error {baseline.mean():.1f} mm"
    if outside.any():
        note += f"; {int(outside.sum())} true point(s) outside their token grid"
    metrics = metric_rows(
        PROBE,
        intervals,
        n_test_scans=int(test.sum()),
        n_test_patients=len(np.unique(test_patients)),
        validation_score=probe.validation_score,
        hyperparameters=json.dumps(to_jsonable(probe.hyperparameters)),
        note=note,
    )
    if context is not None and context.volumes is not None and n_figures > 0:
        _write_figures(
            out / "figures",
            context.volumes,
            embeddings,
            rows[test].head(n_figures),
            y[test][:n_figures],
            predicted[test][:n_figures],
        )
    return pd.DataFrame(metrics)


def _points_outside_grids(grids, y: np.ndarray) -> np.ndarray:
    """(n,) True where a label point lies beyond the scan's token grid (half a token out):
    a frame mix-up (LPS vs RAS, voxel vs world) shows up here first."""
    from voxelfm.probes.localisation import world_to_token_index  # imports torch

    outside = []
    for (tokens, affine), point in zip(grids, y):
        index = world_to_token_index(point, affine)
        outside.append(
            bool(np.any(index < -0.5) or np.any(index > np.array(tokens.shape[:3]) - 0.5))
        )
    return np.array(outside, dtype=bool)


def _write_figures(folder: Path, volumes, embeddings, rows, truth, predicted) -> None:
    """PCA maps and true / predicted points of the given scans, as PNGs in ``folder``."""
    # matplotlib: only when figures are drawn.
    from voxelfm.evaluation.feature_maps import localisation_figure, pca_feature_map_figure

    folder.mkdir(parents=True, exist_ok=True)
    for scan_id, true_xyz, predicted_xyz in zip(rows.scan_id, truth, predicted):
        if scan_id not in volumes:
            continue
        attrs = volumes.attrs(scan_id)
        image = volumes.read_volume(scan_id)
        tokens, _ = embeddings.patch_tokens(scan_id)
        pca_feature_map_figure(
            image,
            attrs["spacing"],
            tokens,
            patch_size=embeddings.patch_size,
            origin=attrs["origin"],
            title=f"{scan_id}: patch-token PCA",
        ).savefig(folder / f"pca_{scan_id}.png", dpi=100)
        error = float(np.linalg.norm(true_xyz - predicted_xyz))
        localisation_figure(
            image,
            attrs["spacing"],
            attrs["origin"],
            true_xyz,
            predicted_xyz,
            title=f"{scan_id}: truth + / prediction o ({error:.0f} mm)",
        ).savefig(folder / f"localisation_{scan_id}.png", dpi=100)
