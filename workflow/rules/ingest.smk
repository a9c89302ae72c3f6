# Ingestion: (synthetic cohort) -> validated manifest -> shards -> Zarr stores -> summary.


rule synthesize_cohort:
    output:
        directory(RESULTS / "synthetic" / "{dataset}"),
    log:
        LOGS / "synthesize_cohort" / "{dataset}.log",
    conda:
        CONDA_ENV
    params:
        spec=lambda wc: as_cli_json(config["datasets"][wc.dataset]["synthetic"]),
    shell:
        "voxelfm synth --out {output} --spec {params.spec} > {log} 2>&1"


rule adapt_dataset:
    # A public dataset's own layout on disk -> manifest.csv + labels.csv + dataset.json.
    output:
        directory(RESULTS / "adapted" / "{dataset}"),
    log:
        LOGS / "adapt_dataset" / "{dataset}.log",
    conda:
        CONDA_ENV
    params:
        command=lambda wc: adapter_command(wc.dataset),
    shell:
        "voxelfm adapt {params.command} --out {output} > {log} 2>&1"


rule validate_manifest:
    input:
        manifest_source,
    output:
        RESULTS / "data" / "{dataset}" / "manifest.csv",
    log:
        LOGS / "validate_manifest" / "{dataset}.log",
    conda:
        CONDA_ENV
    shell:
        "voxelfm manifest --source {input} --out {output} > {log} 2>&1"


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
        n_shards=N_SHARDS,
        out_dir=lambda wc: dataset_dir(wc.dataset) / "shards",
    shell:
        "voxelfm split --manifest {input} --shards {params.n_shards} --out-dir {params.out_dir}"
        " > {log} 2>&1"


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
        preprocess=as_cli_json(config["preprocess"]),
    shell:
        "voxelfm preprocess --shard {input} --store {output.store} --qc {output.qc}"
        " --failures {output.failures} --params {params.preprocess} --workers {threads}"
        " > {log} 2>&1"


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
    shell:
        "voxelfm summarize --stores {input.stores} --qc {input.qc} --failures {input.failures}"
        " --out-dir $(dirname {output.summary}) > {log} 2>&1"
