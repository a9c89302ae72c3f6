"""Every foreign adapter, with random weights and reduced sizes, through one probe of each of
the seven task categories: extraction into a real embedding store, then ``run_task``.

The numbers are meaningless (random weights, random labels); what is checked is that each
adapter's features and patch-token geometry go through every category's runner and give
finite estimates with intervals.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from voxelfm.evaluation.results import BootstrapSettings, DenseContext
from voxelfm.evaluation.run import run_task
from voxelfm.evaluation.tasks import EvaluationTask
from voxelfm.extract.embed import embed_store
from voxelfm.extract.store import EmbeddingStore
from voxelfm.store import VolumeStore
from voxelfm.store.writer import write_scan
from voxelfm.volume import CanonicalVolume

SHAPE = (40, 40, 40)
SPACING = (4.0, 4.0, 4.0)
N_PATIENTS = 12
SPLITS = ["train"] * 6 + ["val"] * 3 + ["test"] * 3

ADAPTERS = {
    "merlin": {
        "input_size": [32, 32, 32],
        "spacing_mm": 4.0,
        "overrides": {"layers": [1, 1, 1, 1], "width": 4, "num_phenotypes": 5, "projection_dim": 6},
    },
    "ct_fm": {"overrides": {"init_filters": 4, "blocks_down": [1, 1, 1, 1, 1]}},
    "m3d_clip": {
        "spacing_mm": 4.0,
        "patch_size": 8,
        "overrides": {
            "img_size": [8, 32, 32],
            "patch_size": [4, 16, 16],
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_layers": 2,
            "num_heads": 4,
        },
    },
    "ct_clip": {
        "spacing_mm": 4.0,
        "overrides": {
            "dim": 32,
            "latent_dim": 32,
            "image_size": 40,
            "frames": 20,
            "spatial_depth": 1,
            "temporal_depth": 1,
            "dim_head": 8,
            "heads": 2,
            "codebook_size": 16,
        },
    },
    "radfm": {
        "image_size": 32,
        "max_frames": 16,
        "overrides": {
            "image_size": 32,
            "frames": 16,
            "image_patch_size": 16,
            "dim": 48,
            "depth": 1,
            "heads": 2,
            "dim_head": 8,
            "mlp_dim": 32,
        },
    },
}

REPORTS = ("No focal abnormality.", "A 6 mm solid nodule in the right upper lobe.")

TASKS = {
    "finding": {"category": "classification", "labels": ["finding"], "probes": ["logistic"]},
    "size": {"category": "regression", "labels": ["size"], "probes": ["ridge"]},
    "outcome": {"category": "survival", "labels": ["time", "event"], "probes": ["cox"]},
    "same_patient": {"category": "retrieval", "probes": ["gallery"]},
    "centre": {
        "category": "localisation",
        "labels": ["x_mm", "y_mm", "z_mm"],
        "probes": ["soft_argmax"],
        "options": {"max_epochs": 5, "lrs": [1e-3], "weight_decays": [1e-4], "n_figures": 0},
    },
    "organs": {
        "category": "segmentation",
        "probes": ["conv_decoder"],
        "options": {"label_map": "seg", "epochs": 2, "width": 8, "n_figures": 0},
    },
    "reports": {
        "category": "report_generation",
        "labels": ["report"],
        "probes": ["nearest_neighbour"],
    },
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 patients (one of them scanned twice), a bright sphere at a per-patient position."""
    folder = tmp_path_factory.mktemp("foreign_cohort")
    store = folder / "shard.zarr"
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), -1)
    rows = []
    for p in range(N_PATIENTS):
        centre = rng.uniform(12, 28, size=3)
        for s in range(2 if p == 0 else 1):
            image = rng.normal(40, 30, size=SHAPE)
            image[:, :, :4] = -1000  # some air
            sphere = np.linalg.norm(grid - centre, axis=-1) < 6
            image[sphere] = 300
            volume = CanonicalVolume(
                image=image.round().astype(np.int16),
                spacing=SPACING,
                origin=(0.0, 0.0, 0.0),
                labels={"seg": sphere.astype(np.uint8)},
            )
            scan_id = f"p{p:02d}_s{s}"
            write_scan(store, scan_id, f"p{p:02d}", volume)
            rows.append(
                {
                    "scan_id": scan_id,
                    "patient_id": f"p{p:02d}",
                    "split": SPLITS[p],
                    "finding": p % 2,
                    "size": float(sphere.sum()),
                    "time": float(1 + p),
                    "event": int(p % 3 != 0),
                    "x_mm": centre[0] * SPACING[0],
                    "y_mm": centre[1] * SPACING[1],
                    "z_mm": centre[2] * SPACING[2],
                    "report": REPORTS[p % 2],
                }
            )
    return store, pd.DataFrame(rows)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_adapter_goes_through_every_category(kind, cohort, tmp_path):
    store, labels = cohort
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = {"kind": kind, "random_weights": True, **ADAPTERS[kind]}
        embeddings = EmbeddingStore(
            embed_store(store, tmp_path / f"{kind}.zarr", spec, device="cpu", progress=False)
        )
        assert embeddings.backbone["weights"] == "random (NOT the released model)"
        context = DenseContext(volumes=VolumeStore(store))
        for name, settings in TASKS.items():
            out = run_task(
                embeddings,
                labels,
                EvaluationTask.from_config(name, settings),
                tmp_path / kind / name,
                bootstrap=BootstrapSettings(n_boot=100),
                context=context,
            )
            metrics = pd.read_csv(out / "metrics.csv")
            assert len(metrics) and metrics["estimate"].notna().all(), (name, metrics)
            assert metrics["ci_low"].notna().any(), (name, metrics)
    finally:
        torch.set_num_threads(threads)
