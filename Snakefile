# AMOC as a Snakemake workflow: the same stages, commands and files as dvc.yaml
# (tests/pipeline/test_pipeline_parity.py keeps the two equal). See docs/pipeline.md.
#
#   snakemake --cores 4                                   # local run
#   snakemake --cores 4 --use-conda                       # in workflow/envs/amoc.yaml
#   snakemake --workflow-profile workflow/profiles/default
#   snakemake --workflow-profile workflow/profiles/slurm  # one SLURM job per rule
#
# params.yaml is the single source of truth: amoc reads it itself. Edit it (or use
# `--config queue_size=4096`, which works for the four top-level knobs because the rules
# pass them on with --set); `--configfile` overrides of nested sections do not reach amoc.

configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/downstream.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/robustness.smk"
include: "workflow/rules/report.smk"


# Cheap rules run on the submitting host under a cluster executor; the download also
# needs the network, which compute nodes often lack.
localrules:
    all,
    download,
    report,


rule all:
    default_target: True
    input:
        "report",
