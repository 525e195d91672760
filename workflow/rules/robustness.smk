rule corruptions:  # CIFAR-10-C-style sets: the official archive, or generated offline (labelled so)
    input:
        "data/prepared",
    output:
        directory("data/corrupted"),
    params:
        **cfg("seed", "corruptions", "data.name", "data.max_member_mb"),
    log:
        "logs/corruptions.log",
    threads: 2
    conda:
        "../envs/amoc.yaml"
    shell:
        "amoc corruptions --params params.yaml --set seed={params.seed} --data data/prepared --out data/corrupted > {log} 2>&1"


rule evaluate_corruptions:  # accuracy per corruption x severity, mean, relative drop
    input:
        "data/prepared",
        "data/corrupted",
        "runs/{model}/classifier.pt",
    output:
        "runs/{model}/corruptions/metrics.json",
        "runs/{model}/corruptions/corruptions.json",
        "runs/{model}/corruptions/corruptions.csv",
        "runs/{model}/corruptions/severity.csv",
    wildcard_constraints:
        model="|".join(MODELS),
    params:
        **cfg("seed", "evaluate.batch_size", "runtime.precision", "model.width", "pretrain.from_encoder"),
        gpu_slot=gpu_slot,
    log:
        "logs/evaluate_corruptions_{model}.log",
    threads: 4
    resources:
        gpu=1,
    conda:
        "../envs/amoc.yaml"
    shell:
        "{params.gpu_slot} amoc evaluate --params params.yaml --set seed={params.seed} --model runs/{wildcards.model}/classifier.pt"
        " --data data/prepared --corruptions data/corrupted --out runs/{wildcards.model}/corruptions > {log} 2>&1"


rule transfer:  # black-box check: PGD-20 examples of each source model scored on every model
    input:
        "data/prepared",
        expand("runs/{model}/classifier.pt", model=MODELS),
    output:
        "runs/transfer/metrics.json",
        "runs/transfer/transfer.json",
        "runs/transfer/transfer.csv",
    params:
        **cfg("seed", "transfer", "evaluate.batch_size", "runtime.precision", "model.width", "pretrain.from_encoder"),
        gpu_slot=gpu_slot,
    log:
        "logs/transfer.log",
    threads: 4
    resources:
        gpu=1,
    conda:
        "../envs/amoc.yaml"
    shell:
        "{params.gpu_slot} amoc transfer --params params.yaml --set seed={params.seed} --runs runs --models " + " ".join(MODELS) +
        " --data data/prepared --out runs/transfer > {log} 2>&1"
