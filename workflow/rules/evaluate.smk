# Frozen-feature evaluation: embed every scan with every backbone, fit each task's probes per
# backbone, and put the results side by side. A task's settings are a param of its own probe
# jobs only, so changing one task reruns that task's probes and the report, nothing else.


rule embed:
    input:
        stores=lambda wc: shard_stores(wc.dataset),
        backbone=backbone_inputs,
    output:
        directory(RESULTS / "embeddings" / "{backbone}" / "{dataset}.zarr"),
    log:
        LOGS / "embed" / "{backbone}" / "{dataset}.log",
    conda:
        CONDA_ENV
    threads: 2
    resources:
        # The slurm profile gives extraction one GPU; 0 runs on CPU.
        gpu=0,
        mem_mb=8000,
        runtime=60,
    params:
        spec=lambda wc: as_cli_json(backbone_spec(wc.backbone)),
        options=lambda wc: extraction_options(wc.backbone),
    shell:
        "voxelfm embed --stores {input.stores} --backbone {wildcards.backbone}"
        " --spec {params.spec} --out {output} {params.options} --threads {threads}"
        " > {log} 2>&1"


rule probe:
    input:
        embeddings=lambda wc: embedding_store(wc.backbone, task_dataset(wc.task)),
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
        task=lambda wc: as_cli_json(task_settings(wc.task)),
        bootstrap=as_cli_json(EVALUATION["bootstrap"]),
    shell:
        "OMP_NUM_THREADS={threads} voxelfm probe --embeddings {input.embeddings}"
        " --labels {input.labels} --task-name {wildcards.task} --task {params.task}"
        " --bootstrap {params.bootstrap} --out {output} > {log} 2>&1"


rule probe_dense:
    input:
        embeddings=lambda wc: embedding_store(wc.backbone, task_dataset(wc.task)),
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
        task=lambda wc: as_cli_json(task_settings(wc.task)),
        bootstrap=as_cli_json(EVALUATION["bootstrap"]),
    shell:
        "OMP_NUM_THREADS={threads} voxelfm probe --embeddings {input.embeddings}"
        " --labels {input.labels} --task-name {wildcards.task} --task {params.task}"
        " --bootstrap {params.bootstrap} --volumes {input.stores} --manifest {input.manifest}"
        " --out {output} > {log} 2>&1"


rule aggregate:
    input:
        [probe_result(task, backbone) for task in TASKS for backbone in BACKBONES],
    output:
        report(
            directory(RESULTS / "report"),
            patterns=["{name}.png"],
            category="Results",
            caption="../report/results.rst",
        ),
    log:
        LOGS / "aggregate.log",
    conda:
        CONDA_ENV
    params:
        results=" ".join(
            f"{task}={backbone}={probe_result(task, backbone)}"
            for task in TASKS
            for backbone in BACKBONES
        ),
        backbones=" ".join(BACKBONES),
        bootstrap=as_cli_json(EVALUATION["bootstrap"]),
    shell:
        "voxelfm report --results {params.results} --backbones {params.backbones}"
        " --bootstrap {params.bootstrap} --out {output} > {log} 2>&1"
