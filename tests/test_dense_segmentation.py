"""Segmentation: decoder shapes, Dice against independent computations, token/voxel
alignment checks, learning on synthetic tokens and the task runner's outputs."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from dense_fakes import FakeEmbeddings, FakeVolumes
from monai.metrics import DiceMetric

from voxelfm.errors import VoxelFMError
from voxelfm.evaluation.results import BootstrapSettings, DenseContext
from voxelfm.evaluation.run import run_task
from voxelfm.evaluation.segmentation import check_token_alignment
from voxelfm.evaluation.tasks import EvaluationTask
from voxelfm.extract.extractor import grid_affine_for
from voxelfm.io.geometry import LPS_TO_RAS
from voxelfm.probes.segmentation import (
    ConvDecoder,
    SegmentationScan,
    confusion_counts,
    dice_macro,
    dice_micro,
    dice_per_class,
    fit_select_conv_decoder,
    padded_labels,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest and keeps a shared machine responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("patch_size", [1, 2, 4, 6, 16])
@pytest.mark.parametrize("grid", [(3, 4, 5), (1, 1, 2)])
def test_decoder_output_has_voxel_resolution(patch_size, grid):
    decoder = ConvDecoder(token_dim=7, n_classes=3, patch_size=patch_size, width=16)
    logits = decoder(torch.randn(2, 7, *grid))
    assert logits.shape == (2, 3, *(g * patch_size for g in grid))
    assert decoder.n_doublings == {1: 0, 2: 1, 4: 2, 6: 2, 16: 4}[patch_size]


def test_decoder_output_at_a_voxel_ignores_far_tokens():
    """Per-voxel norms: a crop and the whole grid give the same logits away from the
    crop's edge (what makes sliding-window inference match training crops)."""
    torch.manual_seed(0)
    decoder = ConvDecoder(token_dim=5, n_classes=2, patch_size=4, width=16).eval()
    tokens = torch.randn(1, 5, 6, 6, 6)
    with torch.no_grad():
        whole = decoder(tokens)
        crop = decoder(tokens[..., :3, :3, :3])
    torch.testing.assert_close(crop, whole[..., :12, :12, :12], atol=1e-5, rtol=1e-5)


def test_dice_matches_monai_and_numpy():
    rng = np.random.default_rng(0)
    n_classes = 5
    truth = rng.integers(0, 4, (12, 10, 8))  # class 4 absent from the truth
    prediction = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 3, truth.shape))
    prediction[prediction == 3] = 0  # class 3 is never predicted
    prediction[0, 0, 0] = 4  # class 4 is predicted once, never true
    confusion = confusion_counts(truth, prediction, n_classes)
    ours = dice_per_class(confusion)

    def one_hot(labels):  # (X, Y, Z) -> (1, C, X, Y, Z)
        return torch.nn.functional.one_hot(torch.as_tensor(labels), n_classes).permute(3, 0, 1, 2)[
            None
        ]

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    monai = metric(one_hot(prediction), one_hot(truth)).numpy()[0]
    np.testing.assert_allclose(ours, monai, atol=1e-6)
    assert ours[3] == 0.0 and ours[2] == 0.0  # class 4 only predicted; class 3 only true

    expected = [
        2
        * np.sum((truth == c) & (prediction == c))
        / (np.sum(truth == c) + np.sum(prediction == c))
        for c in range(1, n_classes)
    ]
    np.testing.assert_allclose(ours, expected)
    assert dice_macro(confusion) == pytest.approx(np.mean(expected))
    foreground_hits = np.sum((truth == prediction) & (truth > 0))
    assert dice_micro(confusion) == pytest.approx(
        2 * foreground_hits / (np.sum(truth > 0) + np.sum(prediction > 0))
    )


def test_class_absent_from_truth_and_prediction_is_left_out():
    truth = np.array([[[0, 1, 1, 0]]])
    prediction = np.array([[[0, 1, 0, 0]]])
    confusion = confusion_counts(truth, prediction, 3)  # class 2 absent everywhere
    dice = dice_per_class(confusion)
    assert dice[0] == pytest.approx(2 / 3) and np.isnan(dice[1])
    assert dice_macro(confusion) == pytest.approx(2 / 3)  # not (2/3 + 1) / 2
    empty = confusion_counts(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int), 3)
    assert np.isnan(dice_macro(empty)) and np.isnan(dice_micro(empty))


def test_padded_labels_read_background_beyond_the_volume():
    labels = np.ones((5, 4, 3), dtype=np.uint8)
    padded = padded_labels(labels, (2, 1, 1), 4)
    assert padded.shape == (8, 4, 4)
    assert padded[:5, :, :3].all() and padded[5:].sum() == 0 and padded[:, :, 3].sum() == 0
    with pytest.raises(VoxelFMError, match="larger than the token grid"):
        padded_labels(labels, (1, 1, 1), 4)


def test_misaligned_tokens_are_refused():
    spacing, origin, p = (2.0, 2.0, 3.0), (-10.0, 5.0, 7.0), 4
    attrs = {"spacing": spacing, "origin": origin}
    geometry = {
        "grid_affine": grid_affine_for(spacing, origin, p).tolist(),
        "volume_shape": [9, 8, 7],
        "spacing": spacing,
    }
    check_token_alignment("ok", geometry, attrs, (9, 8, 7), p)
    shifted = {**geometry, "grid_affine": grid_affine_for(spacing, (-8.0, 5.0, 7.0), p).tolist()}
    with pytest.raises(VoxelFMError, match="does not start at voxel 0"):
        check_token_alignment("shifted", shifted, attrs, (9, 8, 7), p)
    with pytest.raises(VoxelFMError, match="token spacing"):
        check_token_alignment(
            "coarse", {**geometry, "spacing": (4.0, 4.0, 6.0)}, attrs, (9, 8, 7), p
        )
    with pytest.raises(VoxelFMError, match="token volume"):
        check_token_alignment("other", geometry, attrs, (9, 8, 8), p)


def _synthetic_scans(n, rng, patch_size=2, dim=8, n_classes=3):
    """Tokens whose first channels encode the class of their (block-constant) voxels."""
    # The same class codes for every call: train, val and test share them.
    codes = np.random.default_rng(12345).normal(0, 2.0, (n_classes, dim))
    scans = []
    for _ in range(n):
        grid = tuple(int(g) for g in rng.integers(5, 8, 3))
        classes = np.zeros(grid, dtype=np.int64)
        for _ in range(2):  # two boxes of random foreground classes
            lo = [int(rng.integers(0, g - 2)) for g in grid]
            size = [int(rng.integers(2, 4)) for _ in grid]
            classes[tuple(slice(a, a + s) for a, s in zip(lo, size))] = rng.integers(1, n_classes)
        tokens = codes[classes] + rng.normal(0, 0.3, (*grid, dim))
        labels = classes.repeat(patch_size, 0).repeat(patch_size, 1).repeat(patch_size, 2)
        cut = [int(rng.integers(0, patch_size)) for _ in grid]  # volume ends inside a patch
        labels = labels[tuple(slice(0, labels.shape[a] - cut[a]) for a in range(3))]
        scans.append(SegmentationScan(tokens.astype(np.float32), labels.astype(np.uint8)))
    return scans


def test_decoder_learns_synthetic_tokens():
    rng = np.random.default_rng(0)
    train, val, test = (_synthetic_scans(n, rng) for n in (8, 2, 3))
    segmenter = fit_select_conv_decoder(
        train, val, 3, 2, epochs=12, steps_per_epoch=6, crop_tokens=4, width=16, lr=1e-2, seed=0
    )
    assert segmenter.validation_score > 0.8
    for scan in test:
        predicted = segmenter.predict(scan.tokens, scan.labels.shape)
        assert predicted.shape == scan.labels.shape  # grids larger than the 4-token crop
        assert dice_macro(confusion_counts(scan.labels, predicted, 3)) > 0.8
    trace = segmenter.selection_trace
    assert len(trace) == 12 and segmenter.hyperparameters["epochs"] == max(
        range(1, 13), key=lambda e: trace[e - 1]["val_dice"]
    )


def test_run_task_writes_dice_rows_label_maps_and_figures(tmp_path):
    rng = np.random.default_rng(1)
    patch, spacing = 2, (2.0, 2.0, 2.0)
    scans = _synthetic_scans(10, rng, patch_size=patch)
    ids = [f"s{i}" for i in range(10)]
    origins, grids, label_maps, images, sources = {}, [], {}, {}, {}
    for scan_id, scan in zip(ids, scans):
        origin = rng.normal(0, 30, 3)
        origins[scan_id] = origin
        grids.append((scan.tokens, grid_affine_for(spacing, origin, patch)))
        # Label values 3 and 7 in the store: classes {3: liver, 7: spleen}.
        label_maps[scan_id] = {"seg": np.array([0, 3, 7], dtype=np.uint8)[scan.labels]}
        images[scan_id] = rng.normal(0, 100, scan.labels.shape).astype(np.int16)
        # A RAS-aligned source image on the canonical grid: write-back is then the identity.
        source = sitk.GetImageFromArray(np.zeros(scan.labels.shape[::-1], np.float32))
        source.SetSpacing(spacing)
        source.SetOrigin((LPS_TO_RAS @ origin).tolist())
        source.SetDirection(LPS_TO_RAS.ravel().tolist())
        sources[scan_id] = tmp_path / f"{scan_id}.nii.gz"
        sitk.WriteImage(source, str(sources[scan_id]))
    embeddings = FakeEmbeddings(grids, ids, ids, patch, spacing)
    volumes = FakeVolumes(images, label_maps, spacing, origins)
    volumes.shape = lambda scan_id: images[scan_id].shape  # the real (cut) volume shape
    embeddings.patch_geometry = lambda scan_id: {
        "grid_affine": grids[ids.index(scan_id)][1].tolist(),
        "volume_shape": list(images[scan_id].shape),
        "spacing": list(spacing),
    }
    labels = pd.DataFrame(
        {"scan_id": ids, "patient_id": ids, "split": ["train"] * 5 + ["val"] * 2 + ["test"] * 3}
    )
    task = EvaluationTask.from_config(
        "organs",
        {
            "category": "segmentation",
            "options": {
                "label_map": "seg",
                "classes": {"3": "liver", "7": "spleen"},
                "epochs": 6,
                "steps_per_epoch": 6,
                "crop_tokens": 4,
                "width": 16,
                "lr": 1e-2,
                "max_writeback": 2,
                "device": "cpu",
            },
        },
    )
    out = run_task(
        embeddings,
        labels,
        task,
        tmp_path / "result",
        bootstrap=BootstrapSettings(n_boot=30),
        context=DenseContext(volumes=volumes, sources={k: str(v) for k, v in sources.items()}),
    )
    metrics = pd.read_csv(out / "metrics.csv").set_index("metric")
    assert list(metrics.index) == ["dice:liver", "dice:spleen", "dice_macro", "dice_micro"]
    assert json.loads(metrics["hyperparameters"].iloc[0])["classes"] == {
        "3": "liver",
        "7": "spleen",
    }
    predictions = pd.read_csv(out / "predictions.csv")
    test = predictions[predictions["split"] == "test"]
    assert predictions.loc[predictions["split"] != "test", "dice_macro"].isna().all()
    assert metrics.loc["dice_macro", "estimate"] == pytest.approx(test["dice_macro"].mean())
    assert metrics.loc["dice:liver", "estimate"] == pytest.approx(test["dice:liver"].mean())

    written = sorted((out / "label_maps").iterdir())
    assert [p.name for p in written] == ["s7.nii.gz", "s8.nii.gz"]
    for path in written:
        back = nib.load(path)
        source = nib.load(sources[path.name.split(".")[0]])
        assert back.shape == source.shape
        np.testing.assert_allclose(back.affine, source.affine, atol=1e-5)
        values = set(np.unique(np.asarray(back.dataobj)).tolist())
        assert values <= {0, 3, 7} and values - {0}  # original label values come back
        truth = label_maps[path.name.split(".")[0]]["seg"]
        # Same grid, RAS-aligned: the written map is the prediction on the canonical grid.
        agreement = (np.asarray(back.dataobj) == truth).mean()
        assert agreement > 0.7
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["pca_s7.png", "pca_s8.png", "segmentation_s7.png", "segmentation_s8.png"]


def test_segmentation_needs_a_volume_store_and_a_label_map(tmp_path):
    rng = np.random.default_rng(2)
    scans = _synthetic_scans(3, rng)
    ids = ["a", "b", "c"]
    grids = [(s.tokens, grid_affine_for((1, 1, 1), (0, 0, 0), 2)) for s in scans]
    labels = pd.DataFrame({"scan_id": ids, "patient_id": ids, "split": ["train", "val", "test"]})
    embeddings = FakeEmbeddings(grids, ids, ids, 2)
    task = EvaluationTask.from_config(
        "t", {"category": "segmentation", "options": {"label_map": "seg"}}
    )
    with pytest.raises(VoxelFMError, match="needs the volume store"):
        run_task(embeddings, labels, task, tmp_path / "r")
    no_map = EvaluationTask.from_config("t", {"category": "segmentation", "options": {"epochs": 1}})
    with pytest.raises(VoxelFMError, match="needs options.label_map"):
        run_task(embeddings, labels, no_map, tmp_path / "r", context=DenseContext(volumes=object()))


def test_scans_without_the_label_map_are_left_out_and_reported(tmp_path):
    """A collection mixes cohorts: only the contoured scans take part, the rest are listed."""
    rng = np.random.default_rng(3)
    patch, spacing = 2, (2.0, 2.0, 2.0)
    scans = _synthetic_scans(8, rng, patch_size=patch)
    ids = [f"s{i}" for i in range(8)]
    grids, images, label_maps, origins = [], {}, {}, {}
    for k, (scan_id, scan) in enumerate(zip(ids, scans)):
        origins[scan_id] = np.zeros(3)
        grids.append((scan.tokens, grid_affine_for(spacing, origins[scan_id], patch)))
        images[scan_id] = np.zeros(scan.labels.shape, np.int16)
        # Scans 1 and 4 come from a cohort without this structure set.
        label_maps[scan_id] = {} if k in (1, 4) else {"seg": scan.labels.astype(np.uint8)}
    embeddings = FakeEmbeddings(grids, ids, ids, patch, spacing)
    volumes = FakeVolumes(images, label_maps, spacing, origins)
    volumes.shape = lambda scan_id: images[scan_id].shape
    embeddings.patch_geometry = lambda scan_id: {
        "grid_affine": grids[ids.index(scan_id)][1].tolist(),
        "volume_shape": list(images[scan_id].shape),
        "spacing": list(spacing),
    }
    split = ["train", "train", "train", "val", "val", "test", "test", "train"]
    labels = pd.DataFrame({"scan_id": ids, "patient_id": ids, "split": split})
    options = {"label_map": "seg", "epochs": 1, "width": 8, "n_figures": 0, "device": "cpu"}
    task = EvaluationTask.from_config("organs", {"category": "segmentation", "options": options})
    out = run_task(
        embeddings,
        labels,
        task,
        tmp_path / "result",
        bootstrap=BootstrapSettings(n_boot=30),
        context=DenseContext(volumes=volumes),
    )
    info = json.loads((out / "task.json").read_text())
    assert info["dropped_scans"] == {"s1": "no label map 'seg'", "s4": "no label map 'seg'"}
    assert info["n_scans"] == {"train": 3, "val": 1, "test": 2}
    assert set(pd.read_csv(out / "predictions.csv")["scan_id"]) == set(ids) - {"s1", "s4"}
