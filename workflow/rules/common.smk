# Shared by the rules. Kept tiny: the rules should read like their dvc.yaml stages.
from functools import reduce

MODELS = ["slf", "alf", "aff", "scratch"]  # every classifier that is evaluated

# What each stage reads from params.yaml goes into its `params:`, listed by the same dotted
# keys as in dvc.yaml. runtime.device, threads, progress, compile and channels_last are
# never listed: they change how a job runs, not what it computes (runtime.precision does).


# GPUs per training job (`--config gpus=4`): above 1, pretrain, probe and finetune run
# through torchrun on one node, data-parallel (docs/distributed.md), and ask the
# scheduler for that many GPUs. Not a params.yaml key: it changes how fast a job runs,
# not what it computes (batch sizes are global), so it re-runs nothing.
GPUS = int(config.get("gpus", 1))


class Launcher:
    """What starts amoc in a training job: `amoc`, or torchrun under --config gpus=N.

    Passed to the shell through `params: launcher=LAUNCHER` (so `snakemake --lint` is clean).
    Deliberately not a str: Snakemake's params trigger leaves out values it cannot store
    (persistence: UNREPRESENTABLE), so changing the number of GPUs re-runs nothing."""

    def __str__(self):
        return "amoc" if GPUS <= 1 else f"torchrun --standalone --nproc_per_node {GPUS} -m amoc"


LAUNCHER = Launcher()


def cfg(*keys):
    """{dotted key: config value}, e.g. cfg("seed", "runtime.precision").

    Spread into `params:` (params: **cfg(...)), so that Snakemake's params trigger re-runs
    the job, and everything downstream of it, exactly when one of these values changes."""
    return {key: reduce(lambda node, part: node[part], key.split("."), config) for key in keys}
