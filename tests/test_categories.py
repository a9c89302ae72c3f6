"""Task categories are declared once (voxelfm.evaluation.categories) and everything else
agrees with that declaration: task parsing, dispatch, the config schema, the workflow's rule
routing and the per-category code versions. A toy eighth category goes through it all."""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import toy_category
import yaml
from toy_category import run_train_mean

from voxelfm.errors import VoxelFMError
from voxelfm.evaluation import BootstrapSettings, EvaluationTask, run_task
from voxelfm.evaluation.categories import CATEGORIES, TaskCategory, register
from voxelfm.evaluation.options import convert_options
from voxelfm.evaluation.results import METRICS_FILE, RANKS_FILE, TASK_FILE
from voxelfm.probes.fitted import FittedProbe
from voxelfm.probes.registry import PROBE_FITTERS, metric_functions
from voxelfm.probes.retrieval import recall_at_k
from voxelfm.versions import PROBE_VERSIONS

REPO = Path(__file__).resolve().parents[1]
FAST_BOOTSTRAP = BootstrapSettings(n_boot=100, seed=0)


class FakeEmbeddings:
    """The reader interface run_task uses, over in-memory arrays."""

    def __init__(self, table: pd.DataFrame, features: np.ndarray):
        self.scan_ids = list(table.scan_id)
        self.patient_ids = list(table.patient_id)
        self._features = features.astype(np.float32)
        self.attrs = {"backbone": "fake"}

    def global_features(self, kind="cls+pooled"):
        return self._features


def cohort(n_patients=30, seed=0):
    """Patients with one or two scans; repeat scans share a latent (retrievable)."""
    rng = np.random.default_rng(seed)
    rows, features = [], []
    for p in range(n_patients):
        latent = rng.standard_normal(6)
        for s in range(1 + (p % 2)):
            rows.append(
                {
                    "scan_id": f"p{p:02d}_s{s}",
                    "patient_id": f"p{p:02d}",
                    "target": float(10 + 3 * latent[0] + rng.standard_normal()),
                    "split": ("train", "train", "val", "test")[p % 4],
                }
            )
            features.append(latent + 0.3 * rng.standard_normal(6))
    return pd.DataFrame(rows), np.stack(features)


@pytest.fixture
def train_mean_category():
    # The registration docs/contributing.md shows (there: one call at the end of categories.py).
    register(
        TaskCategory(
            name="train_mean",
            runner=run_train_mean,
            rule="probe",
            probes=("train_mean",),
            default_probes=("train_mean",),
            label_columns=1,
            metrics=("mae",),
        )
    )
    yield CATEGORIES["train_mean"]
    CATEGORIES.unregister("train_mean")


def test_a_toy_category_runs_through_the_same_dispatch(tmp_path, train_mean_category):
    table, features = cohort()
    task = EvaluationTask.from_config(
        "volume_chance", {"category": "train_mean", "labels": ["target"]}
    )
    assert task.probes == ("train_mean",)  # the declared default
    out = run_task(
        FakeEmbeddings(table, features), table, task, tmp_path / "out", bootstrap=FAST_BOOTSTRAP
    )
    metrics = pd.read_csv(out / METRICS_FILE)
    assert metrics[["task", "category", "probe", "metric"]].values.tolist() == [
        ["volume_chance", "train_mean", "train_mean", "mae"]
    ]
    train, test = table[table.split == "train"], table[table.split == "test"]
    expected = np.abs(test.target - train.target.mean()).mean()
    assert metrics.estimate[0] == pytest.approx(expected)
    assert metrics.ci_low[0] <= expected <= metrics.ci_high[0]
    summary = json.loads((out / TASK_FILE).read_text())
    assert summary["n_scans"]["test"] == len(test)
    # Parsing checks the toy's declaration like any other category's.
    with pytest.raises(VoxelFMError, match=r"unknown train_mean probe\(s\) \['ridge'\]"):
        EvaluationTask.from_config(
            "t", {"category": "train_mean", "labels": ["target"], "probes": ["ridge"]}
        )
    with pytest.raises(VoxelFMError, match=r"needs 1 label column"):
        EvaluationTask.from_config("t", {"category": "train_mean", "labels": []})
    with pytest.raises(VoxelFMError, match="takes no options"):
        EvaluationTask.from_config(
            "t", {"category": "train_mean", "labels": ["target"], "options": {"k": 1}}
        )


def test_an_unregistered_category_is_refused():
    with pytest.raises(VoxelFMError, match="category must be one of"):
        EvaluationTask.from_config("t", {"category": "train_mean", "labels": ["target"]})


def test_registration_checks_the_declaration(train_mean_category):
    with pytest.raises(VoxelFMError, match="already registered"):
        register(train_mean_category)
    with pytest.raises(VoxelFMError, match="rule must be one of"):
        register(TaskCategory("x", run_train_mean, "probe_gpu", ("a",), ("a",), 1, ("m",)))
    with pytest.raises(VoxelFMError, match="default probes"):
        register(TaskCategory("x", run_train_mean, "probe", ("a",), ("b",), 1, ("m",)))
    assert "x" not in CATEGORIES


def test_runners_follow_the_protocol():
    expected = ["task", "data", "embeddings", "bootstrap", "out", "context"]
    for category in CATEGORIES.values():
        assert list(inspect.signature(category.runner).parameters) == expected, category.name


def test_the_config_schema_lists_exactly_the_categories():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    task_schema = schema["properties"]["evaluation"]["properties"]["tasks"]
    assert task_schema["additionalProperties"]["properties"]["category"]["enum"] == list(CATEGORIES)


def test_the_workflow_routes_each_category_to_its_rule():
    """common.smk cannot import the runners at parse time; its routing is checked here."""
    text = (REPO / "workflow/rules/common.smk").read_text()
    match = re.search(r"^DENSE_CATEGORIES = (\(.*?\))$", text, re.MULTILINE | re.DOTALL)
    assert match, "common.smk no longer defines DENSE_CATEGORIES"
    dense = set(ast.literal_eval(match.group(1)))
    assert dense == {name for name, c in CATEGORIES.items() if c.rule == "probe_dense"}


def test_every_category_has_a_code_version():
    assert list(PROBE_VERSIONS) == list(CATEGORIES)


def test_vector_categories_declare_the_metrics_their_probes_report():
    for name in PROBE_FITTERS:
        category = CATEGORIES[name]
        assert category.probes == tuple(PROBE_FITTERS[name])
        probe = FittedProbe(name, "any", {}, 0.0, predict=lambda X: X)
        assert tuple(metric_functions(probe)) == category.metrics


def test_retrieval_reports_recall_at_k_of_its_written_ranks(tmp_path):
    """The metrics the retrieval runner writes are the tested recall_at_k of its ranks."""
    table, features = cohort(seed=1)
    task = EvaluationTask.from_config("repeat", {"category": "retrieval"})
    out = run_task(
        FakeEmbeddings(table, features), table, task, tmp_path / "out", bootstrap=FAST_BOOTSTRAP
    )
    metrics = pd.read_csv(out / METRICS_FILE)
    ranks = pd.read_csv(out / RANKS_FILE)
    assert set(metrics.metric) == set(CATEGORIES["retrieval"].metrics)
    for protocol in ("gallery", "pool"):
        written = metrics[metrics.probe == protocol].set_index("metric").estimate
        recall = recall_at_k(ranks.loc[ranks.protocol == protocol, "rank"].to_numpy())
        assert 0 < recall["recall@1"] < 1  # a ranking that can tell a wrong recall apart
        for name, value in recall.items():
            assert written[name] == pytest.approx(value)


def test_option_tables_convert_and_refuse_in_one_way():
    task = SimpleNamespace(name="lesion", options={"radius": "20", "sizes": [1, "2"]})

    table = {"radius": float, "sizes": lambda v: tuple(int(x) for x in v), "depth": int}
    assert convert_options(task, table, "toy") == {"radius": 20.0, "sizes": (1, 2)}
    task.options = {"radius": 1, "colour": "red"}
    with pytest.raises(VoxelFMError, match=r"task 'lesion': unknown toy option\(s\) \['colour'\]"):
        convert_options(task, table, "toy")
    task.options = {"depth": "deep"}
    with pytest.raises(VoxelFMError, match="task 'lesion': bad toy option"):
        convert_options(task, table, "toy")


def test_importing_the_categories_does_not_import_torch():
    code = (
        "import sys, voxelfm.evaluation.categories, voxelfm.evaluation.run;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_contributing_guide_shows_the_toy_category_verbatim():
    guide = (REPO / "docs" / "contributing.md").read_text()
    runner = inspect.getsource(toy_category)
    assert runner[runner.index("def run_train_mean") :] in guide
    fixture = inspect.getsource(train_mean_category.__wrapped__)
    registration = re.search(r"^    register\(\n.*?^    \)\n", fixture, re.MULTILINE | re.DOTALL)
    assert registration and textwrap.dedent(registration.group(0)) in guide
