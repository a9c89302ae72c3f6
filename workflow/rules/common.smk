# Path helpers shared by every rule file. Nothing here imports torch or reads data.
import json
import os
import re
from pathlib import Path

from voxelfm.config_checks import adapter_root, dataset_problems, task_problems
from voxelfm import versions  # each rule's `version` param (docs/contributing.md)

# Every rule calls the `voxelfm` tool of the environment that environment.yml describes
# (with --sdm conda, environment.post-deploy.sh installs this checkout into it).
CONDA_ENV = "../../environment.yml"

RESULTS = Path(config["results_dir"])
LOGS = RESULTS / "logs"
DATASETS = sorted(config["datasets"])
N_SHARDS = config["preprocess"]["shards"]
SHARDS = [f"{k:03d}" for k in range(N_SHARDS)]


def dataset_dir(dataset):
    return RESULTS / "data" / dataset


def shard_stores(dataset):
    return [dataset_dir(dataset) / "zarr" / f"shard_{s}.zarr" for s in SHARDS]


def adapted_dir(dataset):
    return RESULTS / "adapted" / dataset


def adapter_arguments(dataset):
    """`voxelfm adapt` arguments for a dataset configured with an adapter (a list: the shell
    command quotes each item with `{params.x:q}`)."""
    adapter = config["datasets"][dataset]["adapter"]
    # adapter_root names the config's own environment variable when it is unset
    root = adapter_root(dataset, adapter)
    arguments = [adapter["name"], "--root", root, "--seed", str(adapter["seed"])]
    for key, value in sorted(adapter["options"].items()):
        arguments += ["--option", f"{key}={value}"]
    return arguments


def manifest_source(wildcards):
    """The manifest a dataset starts from: a user file, an adapter's output folder, or the
    synthetic cohort folder."""
    entry = config["datasets"][wildcards.dataset]
    if "manifest" in entry:
        return entry["manifest"]
    if "adapter" in entry:
        return adapted_dir(wildcards.dataset)
    return RESULTS / "synthetic" / wildcards.dataset


def as_cli_json(value):
    """A config value passed on the command line as compact JSON; the shell command quotes it
    with `{params.x:q}` (shlex.quote), never by hand."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def pretrain_stores():
    datasets = config["pretrain"]["datasets"] or DATASETS
    return [store for ds in datasets for store in shard_stores(ds)]


PRETRAINED_BACKBONE = RESULTS / "pretrain" / "teacher_backbone"
EVALUATION = config["evaluation"]
EVAL_DATASET = EVALUATION["dataset"] or DATASETS[0]
BACKBONES = list(EVALUATION["backbones"])
TASKS = list(EVALUATION["tasks"])
# Probes that train a network on patch tokens or text, with the scans' label maps at hand.
DENSE_CATEGORIES = ("localisation", "segmentation", "report_generation")
DENSE_TASKS = [
    t for t in TASKS if EVALUATION["tasks"][t]["category"] in DENSE_CATEGORIES
]
GLOBAL_TASKS = [t for t in TASKS if t not in DENSE_TASKS]


def task_pattern(tasks):
    """A wildcard constraint matching exactly these task names (never empty)."""
    return "|".join(re.escape(t) for t in tasks) or "(?!)"


def backbone_config(backbone):
    """The backbone's config with "pretrained" replaced by the exported teacher (and
    without its workflow-level `extraction` overrides)."""
    entry = dict(EVALUATION["backbones"][backbone])
    entry.pop("extraction", None)
    for key in ("path", "like"):
        if entry.get(key) == "pretrained":
            if not config["pretrain"]["enabled"]:
                raise ValueError(
                    f"backbone {backbone!r} uses the pretrained teacher but pretrain.enabled "
                    "is false"
                )
            entry[key] = str(PRETRAINED_BACKBONE)
    return entry


def backbone_inputs(wildcards):
    """Files a backbone is built from that this workflow produces (the exported teacher)."""
    entry = backbone_config(wildcards.backbone)
    return [
        entry[k] for k in ("path", "like") if entry.get(k) == str(PRETRAINED_BACKBONE)
    ]


def task_dataset(task):
    """The dataset a task is evaluated on: its own `dataset`, else evaluation.dataset."""
    dataset = EVALUATION["tasks"][task].get("dataset") or EVAL_DATASET
    if dataset not in config["datasets"]:
        raise ValueError(f"task {task!r}: dataset {dataset!r} is not in datasets")
    return dataset


def task_settings(task):
    """The task's probe settings for `voxelfm probe` (the workflow-level keys removed)."""
    return {k: v for k, v in EVALUATION["tasks"][task].items() if k != "dataset"}


def embedding_shard_store(backbone, dataset, shard):
    return RESULTS / "embeddings" / backbone / dataset / f"shard_{shard}.zarr"


def embedding_stores(backbone, dataset=EVAL_DATASET):
    """The embedding stores of every shard of a dataset (read together as one store)."""
    return [embedding_shard_store(backbone, dataset, shard) for shard in SHARDS]


def label_table(dataset=EVAL_DATASET):
    """A label CSV, or a folder with labels.csv (synthetic cohort, adapter output)."""
    entry = config["datasets"][dataset]
    if "labels" in entry:
        return entry["labels"]
    if "synthetic" in entry:
        return RESULTS / "synthetic" / dataset
    if "adapter" in entry:
        return adapted_dir(dataset)
    raise ValueError(
        f"dataset {dataset!r} has no label table (datasets.{dataset}.labels)"
    )


def label_tables(wildcards):
    """The dataset's label table as a list (empty when it has none): checked for patient
    leakage across splits as soon as the manifest is validated."""
    spec = config["datasets"][wildcards.dataset]
    if any(key in spec for key in ("labels", "synthetic", "adapter")):
        return [label_table(wildcards.dataset)]
    return []


def probe_result(task, backbone):
    return RESULTS / "evaluation" / task / backbone


def extraction_options(backbone):
    """`voxelfm embed` options: evaluation.extraction, updated by the backbone's own
    `extraction` mapping (e.g. a model that must see the whole volume at once)."""
    options = {
        **EVALUATION["extraction"],
        **EVALUATION["backbones"][backbone].get("extraction", {}),
    }
    flags = [
        *("--mode", str(options["mode"])),
        *("--overlap", str(options["overlap"])),
        *("--batch-size", str(options["batch_size"])),
        *("--precision", str(options["precision"])),
    ]
    if options["window"] is not None:
        flags += ["--window", str(options["window"])]
    if options["max_patches"] is not None:
        flags += ["--max-patches", str(options["max_patches"])]
    # A list: the shell command quotes each item with `{params.x:q}`.
    return flags


def evaluation_enabled():
    return EVALUATION["enabled"] and bool(TASKS)


def all_targets():
    targets = [dataset_dir(ds) / "summary" / "summary.json" for ds in DATASETS]
    if config["pretrain"]["enabled"]:
        targets.append(PRETRAINED_BACKBONE)
    if evaluation_enabled():
        targets.append(RESULTS / "report")
    return targets


wildcard_constraints:
    dataset=r"[A-Za-z0-9_\-]+",
    backbone=r"[A-Za-z0-9_\-]+",
    task=r"[A-Za-z0-9_\-]+",
    shard=r"\d{3}",


def existing_label_tables():
    """Dataset -> its label table, for the datasets that have one (it may not exist yet)."""
    tables = {}
    for dataset in DATASETS:
        try:
            tables[dataset] = label_table(dataset)
        except ValueError:
            tables[dataset] = None
    return tables


def check_config_before_jobs():
    """Everything about the config that can be checked before a job runs (roots, manifests
    and their images, probe names, label columns): one line per problem."""
    problems = dataset_problems(config["datasets"])
    if evaluation_enabled():
        problems += task_problems(config, existing_label_tables())
    if problems:
        raise ValueError("the config has problems:\n" + "\n".join(problems))


check_config_before_jobs()
