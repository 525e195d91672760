# runs/pretrain/checkpoints is a `persist: true` out in dvc.yaml but not an output here:
# Snakemake deletes a job's outputs before it runs and after it fails (and `update()`
# puts the pre-run copy back on failure), which would throw away exactly what --resume
# needs after a killed run. The same holds for the other training rules.
rule pretrain:
    input:
        "data/prepared",
    output:
        "runs/pretrain/encoder.pt",
        "runs/pretrain/metrics.json",
        "runs/pretrain/summary.json",
        "runs/pretrain/log.csv",
    params:
        **cfg("variant", "queue_size", "leverage", "seed", "model", "pretrain", "distributed", "runtime.precision", "runtime.attack_precision"),
        launcher=LAUNCHER,
        gpu_slot=gpu_slot,
    log:
        "logs/pretrain.log",
    threads: 4  # a scheduling hint (SLURM cpus-per-task); amoc sets torch's from runtime.threads
    resources:
        gpu=GPUS,
    conda:
        "../envs/amoc.yaml"
    shell:
        "{params.gpu_slot} {params.launcher} pretrain --params params.yaml --set variant={params.variant} --set queue_size={params.queue_size}"
        " --set leverage={params.leverage} --set seed={params.seed}"
        " --data data/prepared --out runs/pretrain --resume > {log} 2>&1"
