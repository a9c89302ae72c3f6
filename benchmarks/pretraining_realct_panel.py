"""Does pretraining beat random init on real CT? The pre-registered panel of issue 13.

A quality benchmark, not a speed one: the baseline (a randomly initialised ViT of the same
shape, ``random_init`` seed 0) is embedded in the same run and every task prints the paired
difference, pretrained minus random init, with a 95% patient-bootstrap interval. The tasks,
probes, metrics and the success rule are fixed in ``docs/pretraining_protocol.md``.

Steps: adapt the shared real-CT folder (``shared_ct`` with one re-identification copy of
every OpenKBP and IBSI scan: 470 scans), ingest it at ``--spacing`` mm (both reused when
``--work`` already holds them); pretrain with the recipe of ``config/realct.yaml``
(``pretrain.ssl``) plus ``--overrides``, or take an exported ``--teacher``; embed every
scan with both backbones, in sliding windows of ``--window`` voxels (default: the global
crop size, so the network sees inputs the size it was trained on; 0 = whole volume); then
score every task of ``TASKS`` with out-of-fold probes (five folds; every scan is its own
patient here, so every scan is scored by a probe that never saw it).

    python benchmarks/pretraining_realct_panel.py --data ../shared/data --work /tmp/rc \\
        --spacing 8 --overrides '{"train": {"epochs": 4}}'
    python benchmarks/pretraining_realct_panel.py --data ../shared/data --work /tmp/rc \\
        --spacing 8 --teacher /tmp/rc/teacher --window 0         # no training, whole volumes

Results: docs/pretraining.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import KFold

REPO_ROOT = Path(__file__).resolve().parents[1]
N_FOLDS = 5


@dataclass(frozen=True)
class Task:
    """One pre-registered task: what is predicted, from which features, scored how."""

    category: str  # localisation | classification | regression | retrieval
    target: str  # labels.csv column stem (x/y/z suffixes for an organ centre)
    metric: str
    higher_is_better: bool


# Fixed before the decisive run (docs/pretraining_protocol.md); do not edit after looking.
TASKS: dict[str, Task] = {
    "reidentification": Task("retrieval", "patient_id", "recall@1", True),
    "brainstem_centre": Task("localisation", "brainstem", "mean_error_mm", False),
    "mandible_centre": Task("localisation", "mandible", "mean_error_mm", False),
    "left_parotid_centre": Task("localisation", "left_parotid", "mean_error_mm", False),
    "spinal_cord_centre": Task("localisation", "spinal_cord", "mean_error_mm", False),
    "ptv63_present": Task("classification", "ptv63_present", "auroc", True),
    "ptv70_volume": Task("regression", "ptv70_volume_ml", "r2", True),
    "parotid_dose": Task("regression", "parotid_mean_dose_gy", "r2", True),
}


def realct_recipe() -> dict:
    config = yaml.safe_load((REPO_ROOT / "config" / "realct.yaml").read_text())
    return config["pretrain"]["ssl"]


def prepare(data: Path, work: Path, spacing: float) -> tuple[pd.DataFrame, Path]:
    """Adapter output (labels) and the ingested store, both cached in ``work``."""
    from voxelfm.datasets.shared_ct import adapt
    from voxelfm.ingest.manifest import read_manifest
    from voxelfm.ingest.shards import run_shard

    adapted = work / "adapted"
    if not (adapted / "labels.csv").is_file():
        adapt(data, adapted, reidentification_copies=1)
    store = work / f"store_{spacing:g}mm.zarr"
    if not store.exists():
        manifest = work / "manifest.csv"
        read_manifest(adapted / "manifest.csv").to_csv(manifest, index=False)
        report = run_shard(
            manifest, store, work / "failures.csv", work / "qc.csv", spacing=(spacing,) * 3
        )
        if report.failed:
            sys.exit(f"{report.failed} scans failed ingestion: see {work / 'failures.csv'}")
    labels = pd.read_csv(adapted / "labels.csv").set_index("scan_id")
    return labels, store


def embed(store_path: Path, teacher: Path, window: int, threads: int) -> dict[str, dict]:
    """Per backbone, per scan: CLS, pooled patch tokens, token grid and its affine."""
    import torch

    from voxelfm.extract import build_extractor, extract_features
    from voxelfm.store import VolumeStore

    torch.set_num_threads(threads)
    extractors = {
        "pretrained": build_extractor({"kind": "voxelfm", "path": str(teacher)}, "cpu"),
        "random_init": build_extractor(
            {"kind": "random_init", "like": str(teacher), "seed": 0}, "cpu"
        ),
    }
    store = VolumeStore(store_path)
    options = {"mode": "whole"} if window == 0 else {"mode": "sliding", "window": window}
    out: dict[str, dict] = {name: {} for name in extractors}
    for scan_id in store.scan_ids:
        volume = store.to_canonical_volume(scan_id)
        for name, extractor in extractors.items():
            f = extract_features(volume, extractor, overlap=0.0, batch_size=8, **options)
            out[name][scan_id] = {
                "cls": f.cls,
                "pooled": f.pooled,
                "patch": f.patch.astype(np.float32),
                "grid_affine": f.grid_affine,
            }
    return out


def out_of_fold(n: int, fit_predict, seed: int = 0) -> np.ndarray:
    """Predictions for rows 0..n-1, each from ``fit_predict(fit, val, test)`` without it."""
    predictions: list = [None] * n
    folds = KFold(N_FOLDS, shuffle=True, random_state=seed)
    for train_rows, test_rows in folds.split(np.arange(n)):
        inner = KFold(4, shuffle=True, random_state=seed)
        fit_rows, val_rows = next(inner.split(train_rows))
        values = fit_predict(train_rows[fit_rows], train_rows[val_rows], test_rows)
        for row, value in zip(test_rows, values, strict=True):
            predictions[row] = value
    return np.asarray(predictions)


def reidentification_hits(features: dict, labels: pd.DataFrame) -> tuple[np.ndarray, list]:
    """Per copy: 1 when its original is the nearest original by CLS cosine (recall@1)."""
    originals = [s for s in features if not s.endswith("_copy1")]
    queries = [s for s in features if s.endswith("_copy1")]
    gallery = np.stack([features[s]["cls"] for s in originals])
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    hits = []
    for query in queries:
        q = features[query]["cls"] / np.linalg.norm(features[query]["cls"])
        best = originals[int(np.argmax(gallery @ q))]
        hits.append(float(labels.loc[best, "patient_id"] == labels.loc[query, "patient_id"]))
    return np.asarray(hits), [labels.loc[q, "patient_id"] for q in queries]


def token_votes(patch: np.ndarray, grid_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, D) tokens and (T, 3) RAS mm centres of one scan's token grid."""
    from voxelfm.probes.localisation import token_centres_mm

    return patch.reshape(-1, patch.shape[-1]), token_centres_mm(
        patch.shape[:3], grid_affine
    ).reshape(-1, 3)


def localise(
    tokens: list[np.ndarray], centres: list[np.ndarray], offsets_model, distance_model, top_k: int
) -> np.ndarray:
    """(n, 3) mm: each scan's ``top_k`` tokens predicted nearest the target vote with their
    centre plus predicted offset; the votes are averaged."""
    out = []
    for x, c in zip(tokens, centres, strict=True):
        nearest = np.argsort(distance_model.predict(x))[:top_k]
        out.append((c[nearest] + offsets_model.predict(x[nearest])).mean(axis=0))
    return np.stack(out)


def localisation_errors(features: dict, scans: list, targets: np.ndarray) -> np.ndarray:
    """Out-of-fold Euclidean error (mm) of a linear voting probe on the patch tokens.

    Every token of a training scan is a row: ridge regressions predict the offset from the
    token's centre to the target (3 outputs, in mm) and its length. A test scan's position
    is the mean vote (centre + predicted offset) of the ``top_k`` tokens predicted nearest.
    The ridge strength (shared) and ``top_k`` are chosen on the validation fold.
    """
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from voxelfm.probes.localisation import euclidean_errors_mm

    grids = [token_votes(features[s]["patch"], features[s]["grid_affine"]) for s in scans]
    tokens, centres = [g[0] for g in grids], [g[1] for g in grids]

    def fit_predict(fit, val, test):
        x = np.concatenate([tokens[i] for i in fit])
        offsets = np.concatenate([targets[i] - centres[i] for i in fit])
        distances = np.linalg.norm(offsets, axis=1)
        best = None
        for alpha in (1.0, 100.0, 10_000.0):
            offsets_model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x, offsets)
            distance_model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x, distances)
            for top_k in (1, 4, 16):
                predicted = localise(
                    [tokens[i] for i in val],
                    [centres[i] for i in val],
                    offsets_model,
                    distance_model,
                    top_k,
                )
                error = euclidean_errors_mm(targets[val], predicted).mean()
                if best is None or error < best[0]:
                    best = (error, offsets_model, distance_model, top_k)
        _, offsets_model, distance_model, top_k = best
        return list(
            localise(
                [tokens[i] for i in test],
                [centres[i] for i in test],
                offsets_model,
                distance_model,
                top_k,
            )
        )

    predicted = np.stack(out_of_fold(len(scans), fit_predict))
    return euclidean_errors_mm(targets, predicted)


def global_predictions(features: dict, scans: list, y: np.ndarray, kind: str) -> np.ndarray:
    """Out-of-fold kNN probability (classification) or ridge prediction (regression) on CLS."""
    from voxelfm.probes.classification import fit_select_knn
    from voxelfm.probes.regression import fit_select_ridge

    X = np.stack([features[s]["cls"] for s in scans])
    fit_select = fit_select_knn if kind == "classification" else fit_select_ridge

    def fit_predict(fit, val, test):
        probe = fit_select(X[fit], y[fit], X[val], y[val])
        return list(probe.predict(X[test]))

    return out_of_fold(len(scans), fit_predict)


def score_tasks(
    embeddings: dict[str, dict], labels: pd.DataFrame, tasks: list[str], n_boot: int
) -> pd.DataFrame:
    """One row per task: both backbones' estimates and the paired difference with its 95%
    patient-bootstrap interval (pretrained minus random init) and whether it favours
    pretraining."""
    from voxelfm.stats.bootstrap import paired_bootstrap

    first, second = "pretrained", "random_init"
    rows = []
    for name in tasks:
        task = TASKS[name]
        tick = time.perf_counter()
        if task.category == "retrieval":
            a, patients = reidentification_hits(embeddings[first], labels)
            b, _ = reidentification_hits(embeddings[second], labels)
            y = np.zeros(len(a))
            metric = lambda _y, hits: float(np.mean(hits))
        else:
            originals = labels[labels["cohort"] == "openkbp"]
            if task.category == "localisation":
                columns = [f"{task.target}_{axis}_mm" for axis in "xyz"]
                originals = originals.dropna(subset=columns)
                y = originals[columns].to_numpy(float)
                a, b = (
                    localisation_errors(embeddings[k], list(originals.index), y)
                    for k in (first, second)
                )
                metric = lambda _y, errors: float(np.mean(errors))
            else:
                originals = originals.dropna(subset=[task.target])
                y = originals[task.target].to_numpy(float)
                if task.category == "classification":
                    y = y.astype(int)
                a, b = (
                    global_predictions(embeddings[k], list(originals.index), y, task.category)
                    for k in (first, second)
                )
                metric = roc_auc_score if task.category == "classification" else r2_score
            patients = originals["patient_id"].to_numpy()
        result = paired_bootstrap({task.metric: metric}, y, a, b, patients, n_boot=n_boot, seed=0)[
            task.metric
        ]
        favourable = result.lower > 0 if task.higher_is_better else result.upper < 0
        unfavourable = result.upper < 0 if task.higher_is_better else result.lower > 0
        rows.append(
            {
                "task": name,
                "category": task.category,
                "metric": task.metric,
                "n": len(a),
                first: result.estimate_a,
                second: result.estimate_b,
                "difference": result.difference,
                "lower": result.lower,
                "upper": result.upper,
                "verdict": "better" if favourable else "worse" if unfavourable else "tie",
            }
        )
        print(f"  {name}: {time.perf_counter() - tick:.0f} s", flush=True)
    return pd.DataFrame(rows)


def success(panel: pd.DataFrame) -> bool:
    """The issue's rule: >= 3 tasks better (interval excludes 0 in favour of pretraining)
    spanning >= 2 categories, and no task significantly worse."""
    better = panel[panel["verdict"] == "better"]
    return (
        len(better) >= 3
        and better["category"].nunique() >= 2
        and not (panel["verdict"] == "worse").any()
    )


def peak_memory_mb() -> float:
    """Peak resident memory of this process and its finished children, in MB (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the shared real-CT folder")
    parser.add_argument("--work", type=Path, required=True, help="working folder (reused)")
    parser.add_argument("--spacing", type=float, default=8.0, help="ingestion spacing, mm")
    parser.add_argument(
        "--overrides",
        type=json.loads,
        default={},
        help="JSON SSL overrides on top of config/realct.yaml pretrain.ssl",
    )
    parser.add_argument("--teacher", type=Path, help="exported teacher backbone: skip training")
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="sliding-window edge in voxels (default: global crop size; 0: whole)",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--tag", default="panel", help="name of the output files in --work")
    args = parser.parse_args(argv)

    import torch

    from voxelfm.train.config import merge_overrides, resolve_ssl_config
    from voxelfm.train.export import export_teacher_backbone
    from voxelfm.train.launch import launch_pretraining

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    labels, store = prepare(args.data, args.work, args.spacing)
    recipe = merge_overrides(resolve_ssl_config(realct_recipe()), args.overrides)
    teacher, train_seconds = args.teacher, float("nan")
    if teacher is None:
        tick = time.perf_counter()
        run = launch_pretraining(
            stores=[str(store)],
            out_dir=args.work / f"{args.tag}_run",
            work_dir=args.work / "train",
            overrides=recipe,
            threads=args.threads,
        )
        train_seconds = time.perf_counter() - tick
        print(
            f"pretraining: {train_seconds:.0f} s, peak memory {peak_memory_mb():.0f} MB", flush=True
        )
        teacher = export_teacher_backbone(run, args.work / f"{args.tag}_teacher")
    window = recipe["crops"]["global_crops_size"] if args.window is None else args.window

    tick = time.perf_counter()
    embeddings = embed(store, teacher, window, args.threads)
    print(
        f"embedding ({'whole volumes' if window == 0 else f'{window}-voxel windows'}): "
        f"{time.perf_counter() - tick:.0f} s",
        flush=True,
    )
    panel = score_tasks(
        embeddings, labels.loc[list(embeddings["pretrained"])], args.tasks, args.n_boot
    )
    print(
        f"teacher {teacher}; spacing {args.spacing:g} mm; training {train_seconds:.0f} s; "
        f"peak memory {peak_memory_mb():.0f} MB"
    )
    print(panel.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"success rule met: {success(panel)}")
    panel.to_csv(args.work / f"{args.tag}.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
