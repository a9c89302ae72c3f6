# Self-distillation pretraining and export of the teacher backbone.
# Checkpoints live in pretrain/work/<config hash>/ (not a rule output, so Snakemake never
# deletes them): a killed job resumes from its last checkpoint when rerun. The rule output is
# published atomically once training finishes.


rule pretrain:
    input:
        stores=pretrain_stores(),
    output:
        directory(RESULTS / "pretrain" / "run"),
    log:
        LOGS / "pretrain.log",
    conda:
        CONDA_ENV
    threads: 2
    resources:
        # GPUs per job; 0 trains on CPU. The slurm profile sets gpu, cpus_per_gpu, mem_mb
        # and runtime; more than one GPU launches torchrun with one process per GPU, and
        # nodes > 1 one torchrun per node through srun.
        gpu=0,
        nodes=1,
        mem_mb=8000,
        runtime=60,
    params:
        version=versions.PRETRAIN_VERSION,
        ssl=as_cli_json(config["pretrain"]["ssl"]),
        work_dir=RESULTS / "pretrain" / "work",
    shell:
        "voxelfm pretrain --stores {input.stores:q} --out {output:q}"
        " --work-dir {params.work_dir:q} --overrides {params.ssl:q} --gpus {resources.gpu}"
        " --nodes {resources.nodes} --threads {threads} > {log:q} 2>&1"


rule export_teacher:
    input:
        rules.pretrain.output,
    output:
        directory(RESULTS / "pretrain" / "teacher_backbone"),
    log:
        LOGS / "export_teacher.log",
    conda:
        CONDA_ENV
    params:
        version=versions.EXPORT_VERSION,
    shell:
        "voxelfm export --run {input:q} --out {output:q} > {log:q} 2>&1"
