rule download:
    output:
        directory("data/prepared"),
    params:
        **cfg("data"),
    log:
        "logs/download.log",
    threads: 1
    conda:
        "../envs/amoc.yaml"
    shell:
        "amoc download --params params.yaml --out data/prepared > {log} 2>&1"
