# Path helpers shared by every rule file. Nothing here imports torch or reads data.
import json
from pathlib import Path

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


def manifest_source(wildcards):
    """The manifest a dataset starts from: a user file, or the synthetic cohort folder."""
    spec = config["datasets"][wildcards.dataset]
    if "manifest" in spec:
        return spec["manifest"]
    return RESULTS / "synthetic" / wildcards.dataset


def as_cli_json(value):
    """A config value passed on the command line: compact JSON, quoted for the shell."""
    return f"'{json.dumps(value, separators=(',', ':'), sort_keys=True)}'"


def pretrain_stores():
    datasets = config["pretrain"]["datasets"] or DATASETS
    return [store for ds in datasets for store in shard_stores(ds)]


def all_targets():
    targets = [dataset_dir(ds) / "summary" / "summary.json" for ds in DATASETS]
    if config["pretrain"]["enabled"]:
        targets.append(RESULTS / "pretrain" / "teacher_backbone")
    return targets


wildcard_constraints:
    dataset=r"[A-Za-z0-9_\-]+",
    shard=r"\d{3}",
