"""Run a report_generation task: fit the report probes, generate for test, score, bootstrap.

The runner of the ``report_generation`` category (``voxelfm.evaluation.categories``). For every probe of the
task (``decoder``, ``nearest_neighbour``, ``llm``; see ``voxelfm.probes.report_generation``)
the probe is fitted on the train split, selected on val, and generates one report per test
scan. Metric rows (``metrics.csv``, same schema as the other categories):

* ``bleu4``: corpus BLEU-4 (0-1), recomputed on every patient resample;
* ``rouge_l``: mean per-report ROUGE-L F1;
* ``finding_precision``, ``finding_recall``, ``finding_f1``: micro over (report, finding)
  pairs of the rule-based findings (``voxelfm.evaluation.findings``) of the generated vs the
  reference report, the CT-RATE paper's abnormality F1;
* ``finding_f1_macro``: F1 averaged over the findings positive in the test set's reference
  or generated reports.

Intervals are percentile bootstraps over test patients (``voxelfm.stats.bootstrap``): the
metrics are closures over per-report statistics, indexed by the resampled rows.
``validation_score`` is the val cross-entropy per token for the trained probes and the val
BLEU-4 for the nearest-neighbour baseline (see the note column).

Files: ``predictions.csv`` (test scans: scan_id, patient_id, split, reference and one
``generated:<probe>`` column per probe) and ``<probe>/tokenizer.json`` + ``probe.json`` for
the decoder. Model weights are not kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from voxelfm.errors import VoxelFMError
from voxelfm.evaluation.findings import finding_scores, findings_matrix
from voxelfm.evaluation.results import PREDICTIONS_FILE, BootstrapSettings, metric_rows
from voxelfm.splits import SPLIT_NAMES
from voxelfm.stats.bootstrap import BootstrapResult, bootstrap_metrics
from voxelfm.stats.text_metrics import (
    bleu_from_statistics,
    bleu_statistics,
    corpus_bleu,
    rouge_l_scores,
)
from voxelfm.utils.atomic import write_csv_atomically
from voxelfm.utils.jsonable import to_jsonable

if TYPE_CHECKING:
    from voxelfm.evaluation.tasks import EvaluationTask, TaskData
    from voxelfm.probes.report_generation import ReportSettings

METRICS = (
    "bleu4",
    "rouge_l",
    "finding_precision",
    "finding_recall",
    "finding_f1",
    "finding_f1_macro",
)


def run_report_generation(
    task: EvaluationTask,
    data: TaskData,
    embeddings,
    bootstrap: BootstrapSettings,
    out: Path,
    context: Any = None,
) -> pd.DataFrame:
    """Fit, generate and score every probe of ``task``; returns the metric rows."""
    # The report probes import torch and tokenizers: only when a report task runs.
    from voxelfm.probes.report_generation import fit_decoder, fit_llm, fit_nearest_neighbour

    options = report_options(task)
    out = Path(out)
    reports = data.rows[task.labels[0]].astype(str).to_numpy()
    masks = {split: data.split_mask(split) for split in SPLIT_NAMES}
    train, val, test = masks["train"], masks["val"], masks["test"]
    test_patients = data.rows.loc[test, "patient_id"].to_numpy()
    references = list(reports[test])
    predictions = data.rows.loc[test, ["scan_id", "patient_id", "split"]].reset_index(drop=True)
    predictions["reference"] = references

    visual: tuple[np.ndarray, str] | None = None
    rows = []
    for probe_name in task.probes:
        start = time.perf_counter()
        if probe_name == "nearest_neighbour":
            features = embeddings.global_features(task.features)[data.embedding_rows]
            probe = fit_nearest_neighbour(features[train], reports[train])
            generated = probe.generate(features[test])
            validation_score = corpus_bleu(probe.generate(features[val]), list(reports[val]))
            note = f"nearest training scan by cosine of the {task.features} vector; "
            note += "validation_score: val BLEU-4"
        else:
            visual = visual or visual_inputs(task, data, embeddings, options.visual_inputs)
            inputs, described = visual
            if probe_name == "decoder":
                fit, settings = fit_decoder, options.decoder_settings()
            elif probe_name == "llm":
                fit, settings = fit_llm, options.llm_settings()
            else:
                raise VoxelFMError(f"task {task.name!r}: unknown report probe {probe_name!r}")
            probe = fit(
                inputs[train],
                list(reports[train]),
                inputs[val],
                list(reports[val]),
                settings=settings,
                seed=task.seed,
            )
            generated = probe.generate(inputs[test])
            validation_score = probe.validation_loss
            note = f"visual inputs: {described}; validation_score: val cross-entropy per token"
            if hasattr(probe, "save"):
                probe.save(out / probe_name)
        note += f"; fit + generate {time.perf_counter() - start:.1f} s"
        predictions[f"generated:{probe_name}"] = generated
        intervals = report_metric_intervals(generated, references, test_patients, bootstrap)
        rows += metric_rows(
            probe_name,
            intervals,
            n_test_scans=int(test.sum()),
            n_test_patients=len(np.unique(test_patients)),
            validation_score=float(validation_score),
            hyperparameters=json.dumps(to_jsonable(probe.hyperparameters)),
            note=note,
        )
    write_csv_atomically(predictions, out / PREDICTIONS_FILE)
    return pd.DataFrame(rows)


def report_options(task: EvaluationTask) -> ReportSettings:
    """The task's options, checked (``ReportSettings``; the llm probe needs ``llm_path``)."""
    from voxelfm.probes.report_generation import ReportSettings  # imports torch

    return ReportSettings.from_mapping(task.options, task=task.name, probes=task.probes)


def visual_inputs(
    task: EvaluationTask, data: TaskData, embeddings, choice: str = "auto"
) -> tuple[np.ndarray, str]:
    """(n, T, D) visual inputs of the task's scans and a description of what they are.

    Patch tokens pooled to ``task.token_grid`` (T = gx * gy * gz) when every scan has them
    and ``choice`` is auto or patch; otherwise the global ``task.features`` vector (T = 1).
    """
    if choice in ("auto", "patch"):
        tokens = _pooled_patch_tokens(task, data, embeddings)
        if tokens is not None:
            return tokens, f"patch tokens pooled to {tuple(task.token_grid)}"
        if choice == "patch":
            raise VoxelFMError(
                f"task {task.name!r}: options.visual_inputs is 'patch' but the embedding store "
                "has no patch tokens for every scan"
            )
    features = embeddings.global_features(task.features)[data.embedding_rows]
    return features[:, None, :].astype(np.float32), f"global {task.features} vector"


def _pooled_patch_tokens(task: EvaluationTask, data: TaskData, embeddings) -> np.ndarray | None:
    scan_ids = list(data.rows["scan_id"])
    has_tokens = getattr(embeddings, "has_patch_tokens", None)
    if has_tokens is not None and not all(has_tokens(scan_id) for scan_id in scan_ids):
        return None
    pooled = [embeddings.pooled_patch_grid(scan_id, grid=task.token_grid) for scan_id in scan_ids]
    if any(tokens is None for tokens in pooled):
        return None
    return np.stack(pooled).astype(np.float32)  # (n, T, D)


def report_metric_intervals(
    generated: Sequence[str],
    references: Sequence[str],
    patient_ids: Sequence,
    bootstrap: BootstrapSettings,
) -> dict[str, BootstrapResult]:
    """Estimate and patient-bootstrap interval of each metric in :data:`METRICS`."""
    if len(generated) != len(references) or len(references) == 0:
        raise VoxelFMError(
            f"{len(generated)} generated reports for {len(references)} references (need >= 1)"
        )
    bleu_stats = bleu_statistics(generated, references)  # (n, 10)
    rouge = rouge_l_scores(generated, references)  # (n,)
    reference_findings = findings_matrix(references)  # (n, K)
    generated_findings = findings_matrix(generated)
    # The macro average runs over the findings present in this test set (either side), so
    # the 20-odd findings no report mentions do not dilute it; resamples keep this set.
    active = np.flatnonzero((reference_findings | generated_findings).any(axis=0))

    def findings(rows: np.ndarray):
        return finding_scores(reference_findings[rows], generated_findings[rows], labels=active)

    metrics = {
        "bleu4": lambda rows, _: bleu_from_statistics(bleu_stats[rows]),
        "rouge_l": lambda rows, _: float(rouge[rows].mean()),
        "finding_precision": lambda rows, _: findings(rows).precision,
        "finding_recall": lambda rows, _: findings(rows).recall,
        "finding_f1": lambda rows, _: findings(rows).f1,
        "finding_f1_macro": lambda rows, _: findings(rows).f1_macro,
    }
    index = np.arange(len(references))
    return bootstrap_metrics(
        metrics,
        index,
        index,
        patient_ids,
        n_boot=bootstrap.n_boot,
        seed=bootstrap.seed,
        confidence=bootstrap.confidence,
    )
