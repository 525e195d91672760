rule report:  # report/report.md (one table of every metric) and seaborn PNGs
    input:
        "runs/pretrain/summary.json",
        "runs/pretrain/log.csv",
        expand("runs/{model}/{file}", model=MODELS, file=["summary.json", "log.csv", "eval/eval.json", "eval/curve.csv",
                                                         "corruptions/corruptions.json", "corruptions/corruptions.csv"]),
        "runs/transfer/transfer.json",
        "runs/transfer/transfer.csv",
    output:
        directory("report"),
    log:
        "logs/report.log",
    threads: 1
    conda:
        "../envs/amoc.yaml"
    shell:
        "amoc report --params params.yaml --runs runs --out report > {log} 2>&1"
