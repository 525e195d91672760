rule evaluate:  # clean, PGD-20 and AutoAttack accuracy, plus accuracy against eps
    input:
        "data/prepared",
        "runs/{model}/classifier.pt",
        "runs/{model}/classifier_best.pt",  # evaluated too
    output:
        "runs/{model}/eval/metrics.json",
        "runs/{model}/eval/eval.json",
        "runs/{model}/eval/curve.csv",
    wildcard_constraints:
        model="|".join(MODELS),
    params:
        **cfg("seed", "evaluate", "runtime.precision", "model.width", "pretrain.from_encoder"),
        gpu_slot=gpu_slot,
    log:
        "logs/evaluate_{model}.log",
    threads: 4
    resources:
        gpu=1,
    conda:
        "../envs/amoc.yaml"
    shell:
        "{params.gpu_slot} amoc evaluate --params params.yaml --set seed={params.seed}"
        " --model runs/{wildcards.model}/classifier.pt --data data/prepared --out runs/{wildcards.model}/eval > {log} 2>&1"
