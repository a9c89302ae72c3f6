"""Code versions, one per workflow stage: bump one when its stage's output changes.

Every workflow rule passes the version of the code it runs as a ``version`` param, and
Snakemake reruns a job whose params changed. So bumping a constant here reruns that stage and
everything downstream of its outputs, and nothing else. Bump when a change alters what a stage
writes for the same inputs and config (a fix, a new column, another default); a refactor that
writes the same bytes needs no bump. See docs/contributing.md.

Torch-free and cheap: the Snakefile imports this module at parse time.
"""

from __future__ import annotations

# Preprocessing already had its version (written into every volume store's attributes and
# into the ingestion fingerprint); it stays the constant of the conventions module.
from voxelfm.conventions import PREPROCESSING_VERSION

SYNTH_VERSION = "1"  # voxelfm synth: the synthetic cohort (voxelfm.synth)
MANIFEST_VERSION = "1"  # voxelfm manifest / split: validated manifest and its shards
SUMMARY_VERSION = "1"  # voxelfm summarize: the dataset summary (voxelfm.ingest.summary)
PRETRAIN_VERSION = "1"  # voxelfm pretrain: the training loop (voxelfm.ssl, voxelfm.train)
EXPORT_VERSION = "1"  # voxelfm export: the exported teacher backbone
EMBED_VERSION = "1"  # voxelfm embed: feature extraction (voxelfm.extract)
REPORT_VERSION = "1"  # voxelfm report: the aggregated tables and figures

# voxelfm adapt: one version per dataset adapter (also written into its dataset.json), so a
# fix to one adapter re-adapts only the datasets that use it.
ADAPTER_VERSIONS: dict[str, int] = {
    "ctrate": 1,
    "rsna_pe": 1,
    "nsclc_radiomics": 1,
    "osic": 1,
    "luna16": 1,
    "totalsegmentator": 1,
    "shared_ct": 1,
}

# voxelfm probe: one version per task category (voxelfm.evaluation.categories), so a fix to
# one category's runner or probes reruns only the tasks of that category. Code every
# category shares (voxelfm.evaluation.run / results / tasks) bumps all of them.
PROBE_VERSIONS: dict[str, str] = {
    "classification": "1",
    "regression": "1",
    "survival": "1",
    "retrieval": "1",
    "localisation": "1",
    "segmentation": "1",
    "report_generation": "1",
}

__all__ = [
    "ADAPTER_VERSIONS",
    "EMBED_VERSION",
    "EXPORT_VERSION",
    "MANIFEST_VERSION",
    "PREPROCESSING_VERSION",
    "PRETRAIN_VERSION",
    "PROBE_VERSIONS",
    "REPORT_VERSION",
    "SUMMARY_VERSION",
    "SYNTH_VERSION",
]
