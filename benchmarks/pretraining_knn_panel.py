"""Does pretraining beat random init? kNN probes of held-out traits on the demo cohort.

A quality benchmark, not a speed one: the baseline (a randomly initialised ViT of the same
shape, seed 0) is measured in the same run, and every row prints the paired difference.

Steps: generate the demo cohort (80 synthetic patients, 104 scans, seed 0; reused when
``--work`` already holds it), ingest it at ``--spacing`` mm, pretrain with the demo
config's recipe (``config/config.yaml`` ``pretrain.ssl``) plus ``--overrides``, or take an
exported ``--teacher``; embed every scan with both backbones (CLS token); then, for each
patient trait in ``TRAITS`` (from ``patients.csv``, never seen by pretraining), label a
scan 1 when its patient is above the cohort median and score it with the pipeline's kNN
probe (:func:`voxelfm.probes.classification.fit_select_knn`: cosine, distance-weighted,
k chosen on a patient-level validation split) fitted in five folds split by patient, so
every patient is scored once by a probe that never saw them. AUROC differences come with
95% paired patient-bootstrap intervals; a forest plot goes to ``<work>/knn_panel.png``.

    python benchmarks/pretraining_knn_panel.py --work /tmp/panel                # demo recipe
    python benchmarks/pretraining_knn_panel.py --work /tmp/panel --spacing 8 \\
        --overrides '{"crops": {"global_crops_size": 32, "local_crops_size": 16}}'
    python benchmarks/pretraining_knn_panel.py --work /tmp/panel --teacher T    # no training

Results so far: docs/pretraining.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

REPO_ROOT = Path(__file__).resolve().parents[1]

# Patient traits the synthetic generator draws (voxelfm.synth.anatomy.make_phantom), all
# visible on the image: habitus, subcutaneous fat, organ sizes, liver attenuation.
TRAITS = (
    "body_scale_x",
    "body_scale_y",
    "fat_mm",
    "liver_hu",
    "liver_scale",
    "spleen_scale",
    "lung_scale",
)
N_FOLDS = 5


def out_of_fold_knn_scores(
    features: np.ndarray, labels: np.ndarray, patients: np.ndarray, seed: int = 0
) -> np.ndarray:
    """(n,) positive-class kNN scores, each from a probe fitted without that row's patient."""
    from voxelfm.probes.classification import fit_select_knn

    scores = np.full(len(labels), np.nan)
    folds = StratifiedGroupKFold(n_splits=N_FOLDS, shuffle=True, random_state=seed)
    for train_rows, test_rows in folds.split(features, labels, groups=patients):
        inner = StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=seed)
        fit_rows, val_rows = next(
            inner.split(train_rows, labels[train_rows], groups=patients[train_rows])
        )
        fit, val = train_rows[fit_rows], train_rows[val_rows]
        probe = fit_select_knn(features[fit], labels[fit], features[val], labels[val])
        scores[test_rows] = probe.predict(features[test_rows])
    return scores


def trait_panel(
    features: dict[str, np.ndarray],
    patient_traits: pd.DataFrame,
    scan_patients: np.ndarray,
    n_boot: int = 1000,
) -> pd.DataFrame:
    """One row per trait: kNN AUROC of each backbone and the paired difference (first minus
    second backbone) with its 95% patient-bootstrap interval."""
    from voxelfm.stats.bootstrap import paired_bootstrap

    first, second = features
    rows = []
    for trait in TRAITS:
        values = patient_traits[trait]
        labels = (values.loc[scan_patients] > values.median()).to_numpy().astype(int)
        scores = {
            name: out_of_fold_knn_scores(x, labels, scan_patients) for name, x in features.items()
        }
        result = paired_bootstrap(
            {"auroc": roc_auc_score},
            labels,
            scores[first],
            scores[second],
            scan_patients,
            n_boot=n_boot,
            seed=0,
        )["auroc"]
        rows.append(
            {
                "trait": trait,
                first: result.estimate_a,
                second: result.estimate_b,
                "difference": result.difference,
                "lower": result.lower,
                "upper": result.upper,
                "p_value": result.p_value,
            }
        )
    return pd.DataFrame(rows)


def _demo_recipe() -> dict:
    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    return config["pretrain"]["ssl"]


def _ingest(work: Path, spacing: float) -> tuple[Path, Path]:
    from voxelfm.ingest.manifest import read_manifest
    from voxelfm.ingest.shards import run_shard
    from voxelfm.synth import generate_cohort

    cohort = work / "cohort"
    if not (cohort / "cohort.json").is_file():
        generate_cohort(cohort, n_patients=80, seed=0, repeat_fraction=0.3, dicom_fraction=0.3)
    store = work / f"store_{spacing:g}mm.zarr"
    manifest = work / "manifest.csv"
    read_manifest(cohort / "manifest.csv").to_csv(manifest, index=False)
    report = run_shard(
        manifest, store, work / "failures.csv", work / "qc.csv", spacing=(spacing,) * 3
    )
    if report.failed:
        sys.exit(f"{report.failed} scans failed ingestion: see {work / 'failures.csv'}")
    return cohort, store


def _plot(panel: pd.DataFrame, names: tuple[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.45 * len(panel) + 1.2))
    y = np.arange(len(panel))[::-1]
    ax.errorbar(
        panel["difference"],
        y,
        xerr=[panel["difference"] - panel["lower"], panel["upper"] - panel["difference"]],
        fmt="o",
        color="black",
        capsize=3,
    )
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_yticks(y, panel["trait"])
    ax.set_xlabel(f"kNN AUROC, {names[0]} minus {names[1]} (95% patient bootstrap)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder (reused)")
    parser.add_argument("--spacing", type=float, default=4.0, help="ingestion spacing, mm")
    parser.add_argument(
        "--overrides",
        type=json.loads,
        default={},
        help="JSON SSL overrides on top of the demo recipe",
    )
    parser.add_argument("--teacher", type=Path, help="exported teacher backbone: skip training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args(argv)

    import torch

    from voxelfm.extract import build_extractor, extract_features
    from voxelfm.store import VolumeStore
    from voxelfm.train.config import merge_overrides, resolve_ssl_config
    from voxelfm.train.export import export_teacher_backbone
    from voxelfm.train.launch import launch_pretraining

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    cohort, store_path = _ingest(args.work, args.spacing)
    teacher = args.teacher
    if teacher is None:
        recipe = merge_overrides(resolve_ssl_config(_demo_recipe()), args.overrides)
        tick = time.perf_counter()
        run = launch_pretraining(
            stores=[str(store_path)],
            out_dir=args.work / "run",
            work_dir=args.work / "train",
            overrides=recipe,
            threads=args.threads,
        )
        print(f"pretraining: {time.perf_counter() - tick:.0f} s", flush=True)
        teacher = export_teacher_backbone(run, args.work / "teacher")

    extractors = {
        "pretrained": build_extractor({"kind": "voxelfm", "path": str(teacher)}, "cpu"),
        "random_init": build_extractor(
            {"kind": "random_init", "like": str(teacher), "seed": 0}, "cpu"
        ),
    }
    store = VolumeStore(store_path)
    features: dict[str, list] = {name: [] for name in extractors}
    for scan_id in store.scan_ids:
        volume = store.to_canonical_volume(scan_id)
        for name, extractor in extractors.items():
            features[name].append(extract_features(volume, extractor).cls)
    scan_patients = np.array([store.patient_id(scan_id) for scan_id in store.scan_ids])
    traits = pd.read_csv(cohort / "patients.csv").set_index("patient_id")

    panel = trait_panel(
        {name: np.asarray(rows) for name, rows in features.items()},
        traits,
        scan_patients,
        n_boot=args.n_boot,
    )
    print(f"{len(store.scan_ids)} scans, {len(set(scan_patients))} patients; teacher {teacher}")
    print(panel.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    panel.to_csv(args.work / "knn_panel.csv", index=False)
    _plot(panel, tuple(extractors), args.work / "knn_panel.png")
    print(f"plot: {args.work / 'knn_panel.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
