# Classifiers on top of the pre-trained encoder, plus the from-scratch baseline. Their
# runs/<m>/checkpoints folders are resume state, not outputs (see pretrain.smk).


rule probe:  # linear heads on the frozen encoder: SLF (clean) and ALF (adversarial)
    input:
        "data/prepared",
        "runs/pretrain/encoder.pt",
    output:
        "runs/{mode}/classifier.pt",
        "runs/{mode}/classifier_best.pt",
        "runs/{mode}/summary.json",
        "runs/{mode}/log.csv",
    wildcard_constraints:
        mode="slf|alf",
    params:
        **cfg("seed", "probe", "distributed", "runtime.precision", "runtime.attack_precision"),
        launcher=LAUNCHER,
        gpu_slot=gpu_slot,
    log:
        "logs/probe_{mode}.log",
    threads: 4
    resources:
        gpu=GPUS,
    conda:
        "../envs/amoc.yaml"
    shell:
        "{params.gpu_slot} {params.launcher} probe --params params.yaml --set seed={params.seed} --mode {wildcards.mode}"
        " --encoder runs/pretrain/encoder.pt --data data/prepared --out runs/{wildcards.mode} --resume > {log} 2>&1"


rule finetune_aff:  # adversarial full fine-tuning of the pre-trained encoder
    input:
        "data/prepared",
        "runs/pretrain/encoder.pt",
    output:
        "runs/aff/classifier.pt",
        "runs/aff/classifier_best.pt",
        "runs/aff/summary.json",
        "runs/aff/log.csv",
    params:
        **cfg("seed", "finetune", "distributed", "runtime.precision", "runtime.attack_precision"),
        launcher=LAUNCHER,  # no `model`: encoder.pt carries it
        gpu_slot=gpu_slot,
    log:
        "logs/finetune_aff.log",
    threads: 4
    resources:
        gpu=GPUS,
    conda:
        "../envs/amoc.yaml"
    shell:
        "{params.gpu_slot} {params.launcher} finetune --params params.yaml --set seed={params.seed}"
        " --init runs/pretrain/encoder.pt --data data/prepared --out runs/aff --resume > {log} 2>&1"


rule finetune_scratch:  # the same adversarial training from a random init: the baseline
    input:
        "data/prepared",
    output:
        "runs/scratch/classifier.pt",
        "runs/scratch/classifier_best.pt",
        "runs/scratch/summary.json",
        "runs/scratch/log.csv",
    params:
        **cfg("seed", "finetune", "model.arch", "model.width", "distributed", "runtime.precision", "runtime.attack_precision"),
        launcher=LAUNCHER,
        gpu_slot=gpu_slot,
    log:
        "logs/finetune_scratch.log",
    threads: 4
    resources:
        gpu=GPUS,
    conda:
        "../envs/amoc.yaml"
    shell:
        "{params.gpu_slot} {params.launcher} finetune --params params.yaml --set seed={params.seed}"
        " --init scratch --data data/prepared --out runs/scratch --resume > {log} 2>&1"
