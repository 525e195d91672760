# Shared by the rules. Kept tiny: the rules should read like their dvc.yaml stages.
import os
import shlex
from functools import reduce
from pathlib import Path

MODELS = ["slf", "alf", "aff", "scratch"]  # every classifier that is evaluated

# What each stage reads from params.yaml goes into its `params:`, listed by the same dotted
# keys as in dvc.yaml. runtime.device, threads, progress, compile and channels_last are
# never listed: they change how a job runs, not what it computes (runtime.precision does).


# GPUs per training job (`--config gpus=4`): above 1, pretrain, probe and finetune run
# through torchrun on one node, data-parallel (docs/distributed.md), and ask the
# scheduler for that many GPUs. Not a params.yaml key: it changes how fast a job runs,
# not what it computes (batch sizes are global), so it re-runs nothing.
GPUS = int(config.get("gpus", 1))
# Elastic restarts under torchrun (`--config restarts=N`, default 3): when a rank dies
# (a killed process, a lost GPU), torchrun stops the others and starts the group again, up
# to N times; the stage resumes from its last checkpoint (--resume). Not a param either.
RESTARTS = int(config.get("restarts", 3))


class Launcher:
    """What starts amoc in a training job: `amoc`, or torchrun (with elastic restarts) under --config gpus=N.

    Passed to the shell through `params: launcher=LAUNCHER` (so `snakemake --lint` is clean).
    Deliberately not a str: Snakemake's params trigger leaves out values it cannot store
    (persistence: UNREPRESENTABLE), so changing the number of GPUs re-runs nothing."""

    def __str__(self):
        return (
            "amoc" if GPUS <= 1 else f"torchrun --standalone --nproc_per_node {GPUS} --max-restarts {RESTARTS} -m amoc"
        )


LAUNCHER = Launcher()


# Every job that asks for gpu=N starts through workflow/scripts/gpu_slot.py, which claims
# N cards nobody else holds (a lock per card under .snakemake/gpu-slots/), sets
# CUDA_VISIBLE_DEVICES to them and runs the command: `--resources gpu=4` on a 4-GPU
# machine runs four gpu=1 jobs on four cards, not four on cuda:0. The cards are
# `--config gpu_ids=0,1,2,3` if given, else the parent's CUDA_VISIBLE_DEVICES (SLURM's, in
# a SLURM job), else nvidia-smi's. Without GPUs it runs the command as it is.
GPU_SLOT = Path(workflow.basedir) / "workflow" / "scripts" / "gpu_slot.py"
GPU_IDS = config.get("gpu_ids")


def gpu_slot(wildcards, resources):
    """`python3 workflow/scripts/gpu_slot.py [--ids ...] N --`, N = the job's gpu resource.

    Passed to the shell through `params: gpu_slot=gpu_slot`. A function of `resources`:
    N is what the scheduler reserved (a --set-resources override included), and
    Snakemake leaves such derived params out of its params trigger, so neither the cards
    nor the script's location re-runs anything."""
    script = os.path.relpath(GPU_SLOT)  # from the working directory, where the job runs
    if script.startswith(".."):
        script = str(GPU_SLOT)
    words = ["python3", script]
    if GPU_IDS is not None:
        ids = GPU_IDS if isinstance(GPU_IDS, (list, tuple)) else [GPU_IDS]
        words += ["--ids", ",".join(str(i).strip() for i in ids)]
    words += [str(int(getattr(resources, "gpu", 0))), "--"]
    return " ".join(shlex.quote(w) for w in words)


def cfg(*keys):
    """{dotted key: config value}, e.g. cfg("seed", "runtime.precision").

    Spread into `params:` (params: **cfg(...)), so that Snakemake's params trigger re-runs
    the job, and everything downstream of it, exactly when one of these values changes."""
    return {key: reduce(lambda node, part: node[part], key.split("."), config) for key in keys}
