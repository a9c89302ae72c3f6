# Frozen-feature evaluation: embed every scan with every backbone, fit each task's probes per
# backbone, and put the results side by side. A task's settings are a param of its own probe
# jobs only, so changing one task reruns that task's probes and the report, nothing else.


rule embed:
    # One job per (backbone, dataset, shard): N GPUs embed N shards at once. The probes read
    # the union of a dataset's shard stores (voxelfm.extract.EmbeddingStore).
    input:
        stores=RESULTS / "data" / "{dataset}" / "zarr" / "shard_{shard}.zarr",
        backbone=backbone_inputs,
    output:
        directory(embedding_shard_store("{backbone}", "{dataset}", "{shard}")),
    log:
        LOGS / "embed" / "{backbone}" / "{dataset}" / "shard_{shard}.log",
    conda:
        CONDA_ENV
    threads: 2
    resources:
        # The slurm profile gives extraction one GPU; 0 runs on CPU.
        gpu=0,
        mem_mb=8000,
        runtime=60,
    params:
        version=versions.EMBED_VERSION,
        spec=lambda wc: as_cli_json(backbone_config(wc.backbone)),
        options=lambda wc: extraction_options(wc.backbone),
    shell:
        "voxelfm embed --stores {input.stores:q} --backbone {wildcards.backbone:q}"
        " --spec {params.spec:q} --out {output:q} {params.options:q} --threads {threads}"
        " --allow-empty"
        " > {log:q} 2>&1"


rule probe:
    input:
        embeddings=lambda wc: embedding_stores(wc.backbone, task_dataset(wc.task)),
        labels=lambda wc: label_table(task_dataset(wc.task)),
    output:
        directory(RESULTS / "evaluation" / "{task}" / "{backbone}"),
    log:
        LOGS / "probe" / "{task}" / "{backbone}.log",
    wildcard_constraints:
        task=task_pattern(GLOBAL_TASKS),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        version=lambda wc: versions.PROBE_VERSIONS[
            EVALUATION["tasks"][wc.task]["category"]
        ],
        task=lambda wc: as_cli_json(task_settings(wc.task)),
        bootstrap=as_cli_json(EVALUATION["bootstrap"]),
    shell:
        "OMP_NUM_THREADS={threads} voxelfm probe --embeddings {input.embeddings:q}"
        " --labels {input.labels:q} --task-name {wildcards.task:q} --task {params.task:q}"
        " --bootstrap {params.bootstrap:q} --out {output:q} > {log:q} 2>&1"


rule probe_dense:
    input:
        embeddings=lambda wc: embedding_stores(wc.backbone, task_dataset(wc.task)),
        labels=lambda wc: label_table(task_dataset(wc.task)),
        stores=lambda wc: shard_stores(task_dataset(wc.task)),
        manifest=lambda wc: dataset_dir(task_dataset(wc.task)) / "manifest.csv",
    output:
        directory(RESULTS / "evaluation" / "{task}" / "{backbone}"),
    log:
        LOGS / "probe" / "{task}" / "{backbone}.log",
    # Localisation, segmentation and report generation train a small network on patch tokens
    # (the slurm profile gives these jobs a GPU); they also read the scans' label maps and
    # write predicted label maps back into the source images' space.
    wildcard_constraints:
        task=task_pattern(DENSE_TASKS),
    conda:
        CONDA_ENV
    threads: 2
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=60,
    params:
        version=lambda wc: versions.PROBE_VERSIONS[
            EVALUATION["tasks"][wc.task]["category"]
        ],
        task=lambda wc: as_cli_json(task_settings(wc.task)),
        bootstrap=as_cli_json(EVALUATION["bootstrap"]),
    shell:
        "OMP_NUM_THREADS={threads} voxelfm probe --embeddings {input.embeddings:q}"
        " --labels {input.labels:q} --task-name {wildcards.task:q} --task {params.task:q}"
        " --bootstrap {params.bootstrap:q} --volumes {input.stores:q}"
        " --manifest {input.manifest:q} --out {output:q} > {log:q} 2>&1"


rule aggregate:
    input:
        [probe_result(task, backbone) for task in TASKS for backbone in BACKBONES],
    output:
        report(
            directory(RESULTS / "report"),
            # results.html: every table and the paired comparisons, shown in the report;
            # the CSVs ride along as downloads.
            patterns=["{name}.png", "{name}.html", "{name}.csv"],
            category="Results",
            caption="../report/results.rst",
        ),
    log:
        LOGS / "aggregate.log",
    conda:
        CONDA_ENV
    params:
        version=versions.REPORT_VERSION,
        results=[
            f"{task}={backbone}={probe_result(task, backbone)}"
            for task in TASKS
            for backbone in BACKBONES
        ],
        backbones=BACKBONES,
        bootstrap=as_cli_json(EVALUATION["bootstrap"]),
    shell:
        "voxelfm report --results {params.results:q} --backbones {params.backbones:q}"
        " --bootstrap {params.bootstrap:q} --out {output:q} > {log:q} 2>&1"
