# Ingestion: (synthetic cohort) -> validated manifest -> shards -> Zarr stores -> summary.


rule synthesize_cohort:
    output:
        directory(RESULTS / "synthetic" / "{dataset}"),
    log:
        LOGS / "synthesize_cohort" / "{dataset}.log",
    conda:
        CONDA_ENV
    params:
        version=versions.SYNTH_VERSION,
        spec=lambda wc: as_cli_json(config["datasets"][wc.dataset]["synthetic"]),
    shell:
        "voxelfm synth --out {output:q} --spec {params.spec:q} > {log:q} 2>&1"


rule adapt_dataset:
    # A public dataset's own layout on disk -> manifest.csv + labels.csv + dataset.json.
    output:
        directory(RESULTS / "adapted" / "{dataset}"),
    log:
        LOGS / "adapt_dataset" / "{dataset}.log",
    conda:
        CONDA_ENV
    params:
        version=lambda wc: versions.ADAPTER_VERSIONS.get(
            config["datasets"][wc.dataset]["adapter"]["name"]
        ),
        arguments=lambda wc: adapter_arguments(wc.dataset),
    shell:
        "voxelfm adapt {params.arguments:q} --out {output:q} > {log:q} 2>&1"


rule validate_manifest:
    input:
        manifest=manifest_source,
        labels=label_tables,
    output:
        RESULTS / "data" / "{dataset}" / "manifest.csv",
    log:
        LOGS / "validate_manifest" / "{dataset}.log",
    conda:
        CONDA_ENV
    params:
        version=versions.MANIFEST_VERSION,
    shell:
        "voxelfm manifest --source {input.manifest:q} --labels {input.labels:q}"
        " --out {output:q} > {log:q} 2>&1"


rule split_manifest:
    input:
        rules.validate_manifest.output,
    output:
        expand(
            RESULTS / "data" / "{{dataset}}" / "shards" / "shard_{shard}.csv",
            shard=SHARDS,
        ),
    log:
        LOGS / "split_manifest" / "{dataset}.log",
    conda:
        CONDA_ENV
    params:
        version=versions.MANIFEST_VERSION,
        n_shards=N_SHARDS,
        out_dir=lambda wc: dataset_dir(wc.dataset) / "shards",
    shell:
        "voxelfm split --manifest {input:q} --shards {params.n_shards}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule preprocess_shard:
    input:
        RESULTS / "data" / "{dataset}" / "shards" / "shard_{shard}.csv",
    output:
        store=directory(RESULTS / "data" / "{dataset}" / "zarr" / "shard_{shard}.zarr"),
        qc=RESULTS / "data" / "{dataset}" / "qc" / "shard_{shard}.csv",
        failures=RESULTS / "data" / "{dataset}" / "failures" / "shard_{shard}.csv",
    log:
        LOGS / "preprocess_shard" / "{dataset}" / "shard_{shard}.log",
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        version=versions.PREPROCESSING_VERSION,
        preprocess=as_cli_json(config["preprocess"]),
    shell:
        "voxelfm preprocess --shard {input:q} --store {output.store:q} --qc {output.qc:q}"
        " --failures {output.failures:q} --params {params.preprocess:q} --workers {threads}"
        " > {log:q} 2>&1"


rule summarize_dataset:
    input:
        stores=lambda wc: shard_stores(wc.dataset),
        qc=expand(
            RESULTS / "data" / "{{dataset}}" / "qc" / "shard_{shard}.csv", shard=SHARDS
        ),
        failures=expand(
            RESULTS / "data" / "{{dataset}}" / "failures" / "shard_{shard}.csv",
            shard=SHARDS,
        ),
    output:
        summary=RESULTS / "data" / "{dataset}" / "summary" / "summary.json",
        qc=RESULTS / "data" / "{dataset}" / "summary" / "qc.csv",
        failures=RESULTS / "data" / "{dataset}" / "summary" / "failures.csv",
        mosaic=report(
            RESULTS / "data" / "{dataset}" / "summary" / "mosaic.png",
            category="Data",
            caption="../report/mosaic.rst",
        ),
    log:
        LOGS / "summarize_dataset" / "{dataset}.log",
    conda:
        CONDA_ENV
    params:
        version=versions.SUMMARY_VERSION,
        out_dir=lambda wc: dataset_dir(wc.dataset) / "summary",
    shell:
        "voxelfm summarize --stores {input.stores:q} --qc {input.qc:q}"
        " --failures {input.failures:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
