# VoxelFM: CT ingestion -> self-distillation pretraining -> frozen-feature probes -> report.
# Thin on purpose: every rule calls the `voxelfm` command-line tool; all logic is in voxelfm/.
from snakemake.utils import min_version, validate

min_version("9.0")


# The demo config, unless --configfile names another: a study config is complete on its own
# and must not inherit the demo's datasets or tasks.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml", set_default=True)


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        all_targets(),
