"""Localisation: token grid <-> world geometry on a rotated anisotropic scan, the soft-argmax
probe (masking, learning, determinism) and the task runner's outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from dense_fakes import FakeEmbeddings, FakeVolumes

from voxelfm.errors import VoxelFMError
from voxelfm.evaluation.results import BootstrapSettings, DenseContext
from voxelfm.evaluation.run import run_task
from voxelfm.evaluation.tasks import EvaluationTask
from voxelfm.extract import build_extractor, extract_features
from voxelfm.io.geometry import LPS_TO_RAS
from voxelfm.io.preprocess import preprocess_scan
from voxelfm.probes.localisation import (
    SoftArgmaxHead,
    TokenGrids,
    euclidean_errors_mm,
    fit_select_soft_argmax,
    predict_positions,
    token_centres_mm,
    world_to_token_index,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest and keeps a shared machine responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _blob_scan(tmp_path, direction: np.ndarray, blob_index=(21, 14, 9)):
    """A NIfTI scan (anisotropic, given LPS direction) with a bright ball; its RAS centre."""
    size, spacing, origin = (40, 32, 22), (1.1, 1.6, 2.5), (35.0, -20.0, 110.0)
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction.ravel().tolist())
    centre_lps = np.array(image.TransformContinuousIndexToPhysicalPoint(blob_index))
    # World position of every voxel, to draw a ball in mm regardless of the grid.
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), -1)  # (i,j,k,3)
    world = index @ (direction * np.asarray(spacing)).T + np.asarray(origin)
    ball = np.linalg.norm(world - centre_lps, axis=-1) <= 4.5
    voxels = np.where(ball, 1500.0, -800.0).astype(np.float32)  # (i, j, k)
    filled = sitk.GetImageFromArray(np.ascontiguousarray(voxels.transpose(2, 1, 0)))
    filled.CopyInformation(image)
    path = tmp_path / "blob.nii.gz"
    sitk.WriteImage(filled, str(path))
    return path, LPS_TO_RAS @ centre_lps


@pytest.mark.parametrize(
    "direction",
    [
        _rotation(25.0, 12.0),  # oblique: resampled onto the canonical grid
        np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]),  # axes L, P, I
    ],
    ids=["oblique", "permuted_flipped"],
)
def test_token_containing_the_blob_is_centred_on_its_world_point(tmp_path, direction):
    path, centre_ras = _blob_scan(tmp_path, direction)
    volume = preprocess_scan(path, spacing=(1.5, 2.0, 1.25))
    patch = 4
    features = extract_features(
        volume, build_extractor({"kind": "handcrafted", "patch_size": patch})
    )
    mean_khu = features.patch[..., 32]  # after the 32 histogram bins
    brightest = np.unravel_index(np.argmax(mean_khu), mean_khu.shape)
    centre_of_token = token_centres_mm(features.grid_shape, features.grid_affine)[brightest]

    half_patch_mm = patch * np.asarray(volume.spacing) / 2
    assert np.all(np.abs(centre_of_token - centre_ras) <= half_patch_mm + 1e-6)
    # The world -> token mapping names the same token.
    nearest = np.rint(world_to_token_index(centre_ras, features.grid_affine)).astype(int)
    assert tuple(nearest) == tuple(int(i) for i in brightest)
    # Our centres are the extractor's.
    np.testing.assert_allclose(
        token_centres_mm(features.grid_shape, features.grid_affine), features.token_centres()
    )


def test_world_token_world_round_trip():
    affine = np.diag([6.0, 4.5, 10.0, 1.0])
    affine[:3, 3] = [-120.3, 40.0, 7.5]
    rng = np.random.default_rng(0)
    points = rng.uniform(-200, 200, (50, 3))
    index = world_to_token_index(points, affine)
    back = index @ affine[:3, :3].T + affine[:3, 3]
    np.testing.assert_allclose(back, points, atol=1e-9)
    # Integer indices map to the token centres.
    grid = (3, 4, 5)
    centres = token_centres_mm(grid, affine)
    np.testing.assert_allclose(world_to_token_index(centres[2, 1, 4], affine), [2, 1, 4])
    np.testing.assert_allclose(centres[2, 1, 4], [-120.3 + 12.0, 40.0 + 4.5, 7.5 + 40.0])


def _synthetic_grids(n: int, rng: np.random.Generator, dim: int = 16):
    """Scans of varied grid shape and geometry; one token carries a pattern at the target."""
    pattern = 3.0 * np.tile([1.0, -1.0], dim // 2)
    grids, targets = [], []
    for _ in range(n):
        shape = tuple(int(s) for s in rng.integers(4, 8, 3))
        tokens = rng.normal(size=(*shape, dim)).astype(np.float32)
        where = tuple(int(rng.integers(0, s)) for s in shape)
        tokens[where] += pattern
        affine = np.diag([10.0, 12.0, 8.0, 1.0])
        affine[:3, 3] = rng.normal(0, 20, 3)
        targets.append(np.asarray(where) @ affine[:3, :3].T + affine[:3, 3])
        grids.append((tokens, affine))
    return grids, np.array(targets)


def test_probe_learns_the_marked_token():
    rng = np.random.default_rng(0)
    train, y_train = _synthetic_grids(48, rng)
    val, y_val = _synthetic_grids(12, rng)
    test, y_test = _synthetic_grids(16, rng)
    probe = fit_select_soft_argmax(
        train, y_train, val, y_val, lrs=(3e-3,), weight_decays=(1e-4,), max_epochs=30
    )
    errors = euclidean_errors_mm(y_test, probe.predict(test))
    chance = euclidean_errors_mm(y_test, np.broadcast_to(y_train.mean(0), y_test.shape))
    assert chance.mean() > 25
    assert errors.mean() < 5.0  # token steps are 8-12 mm
    assert probe.validation_score < 5.0
    assert probe.hyperparameters["lr"] == 3e-3


def test_padding_is_masked_and_fit_is_deterministic():
    rng = np.random.default_rng(1)
    grids, y = _synthetic_grids(6, rng)
    grids[0] = (grids[0][0][:2, :2, :2], grids[0][1])  # much smaller than the rest
    batch = TokenGrids.from_arrays(grids)
    torch.manual_seed(0)
    head = SoftArgmaxHead(16, hidden_dim=8)
    together = predict_positions(head, batch, batch_size=6)
    alone = np.concatenate([predict_positions(head, TokenGrids.from_arrays([g])) for g in grids])
    np.testing.assert_allclose(together, alone, atol=1e-4)

    def fit():
        probe = fit_select_soft_argmax(
            grids[:4], y[:4], grids[4:], y[4:], lrs=(1e-2,), weight_decays=(0.0,), max_epochs=3
        )
        return probe.predict(grids)

    np.testing.assert_array_equal(fit(), fit())


def test_bad_targets_are_refused():
    rng = np.random.default_rng(2)
    grids, y = _synthetic_grids(3, rng)
    y[1, 2] = np.nan
    with pytest.raises(VoxelFMError, match="non-finite"):
        fit_select_soft_argmax(grids, y, grids, y, max_epochs=1)


def test_run_task_writes_metrics_predictions_and_figures(tmp_path):
    rng = np.random.default_rng(3)
    n = 30
    grids, y = _synthetic_grids(n, rng)
    # Spacing 2.5 x 3 x 2 mm with patch 4 gives the 10 x 12 x 8 mm token steps used above.
    spacing, patch = (2.5, 3.0, 2.0), 4
    scan_ids = [f"s{i:02d}" for i in range(n)]
    patients = [f"p{i // 2:02d}" for i in range(n)]  # two scans per patient
    split = ["train"] * 18 + ["val"] * 6 + ["test"] * 6
    labels = pd.DataFrame(
        {"scan_id": scan_ids, "patient_id": patients, "split": split, "x": y[:, 0]}
    ).assign(y=y[:, 1], z=y[:, 2])
    embeddings = FakeEmbeddings(grids, scan_ids, patients, patch, spacing)
    origins = {s: embeddings.patch_geometry(s)["origin"] for s in scan_ids}
    images = {
        s: rng.normal(0, 300, [g * patch for g in grids[i][0].shape[:3]]).astype(np.int16)
        for i, s in enumerate(scan_ids)
    }
    task = EvaluationTask.from_config(
        "marked",
        {
            "category": "localisation",
            "labels": ["x", "y", "z"],
            "options": {
                "hit_radius_mm": 15,
                "lrs": [3e-3],
                "weight_decays": [1e-4],
                "max_epochs": 25,
            },
        },
    )
    out = run_task(
        embeddings,
        labels,
        task,
        tmp_path / "result",
        bootstrap=BootstrapSettings(n_boot=50),
        context=DenseContext(volumes=FakeVolumes(images, {}, spacing, origins)),
    )
    metrics = pd.read_csv(out / "metrics.csv").set_index("metric")
    assert set(metrics.index) == {"mean_error_mm", "median_error_mm", "hit_rate@15mm"}
    assert (metrics["probe"] == "soft_argmax").all() and (metrics["task"] == "marked").all()
    assert json.loads(metrics["hyperparameters"].iloc[0])["lr"] == 3e-3
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == n
    predicted = predictions[[f"score:soft_argmax:{j}" for j in range(3)]].to_numpy()
    errors = np.linalg.norm(predicted - y, axis=1)
    np.testing.assert_allclose(predictions["error_mm:soft_argmax"], errors)
    test = predictions["split"] == "test"
    # Metrics are on test rows only, computed from the per-scan errors.
    assert metrics.loc["mean_error_mm", "estimate"] == pytest.approx(errors[test].mean())
    assert metrics.loc["median_error_mm", "estimate"] == pytest.approx(np.median(errors[test]))
    assert metrics.loc["hit_rate@15mm", "estimate"] == pytest.approx((errors[test] <= 15).mean())
    low, high = metrics.loc["mean_error_mm", ["ci_low", "ci_high"]]
    assert low <= metrics.loc["mean_error_mm", "estimate"] <= high
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["localisation_s24.png", "localisation_s25.png", "pca_s24.png", "pca_s25.png"]


def test_unknown_option_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    grids, y = _synthetic_grids(6, rng)
    ids = [f"s{i}" for i in range(6)]
    labels = pd.DataFrame(
        {
            "scan_id": ids,
            "patient_id": ids,
            "split": ["train", "train", "val", "val", "test", "test"],
        }
    ).assign(x=y[:, 0], y=y[:, 1], z=y[:, 2])
    task = EvaluationTask.from_config(
        "t", {"category": "localisation", "labels": ["x", "y", "z"], "options": {"radius": 3}}
    )
    with pytest.raises(VoxelFMError, match="unknown localisation option"):
        run_task(FakeEmbeddings(grids, ids, ids), labels, task, tmp_path / "r")
