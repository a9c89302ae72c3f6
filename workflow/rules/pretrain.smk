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
        # and runtime; more than one GPU launches torchrun with one process per GPU.
        gpu=0,
        mem_mb=8000,
        runtime=60,
    params:
        ssl=as_cli_json(config["pretrain"]["ssl"]),
        work_dir=RESULTS / "pretrain" / "work",
    shell:
        "voxelfm pretrain --stores {input.stores} --out {output} --work-dir {params.work_dir}"
        " --overrides {params.ssl} --gpus {resources.gpu} --threads {threads} > {log} 2>&1"


rule export_teacher:
    input:
        rules.pretrain.output,
    output:
        directory(RESULTS / "pretrain" / "teacher_backbone"),
    log:
        LOGS / "export_teacher.log",
    conda:
        CONDA_ENV
    shell:
        "voxelfm export --run {input} --out {output} > {log} 2>&1"
