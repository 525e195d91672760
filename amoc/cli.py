"""`amoc STAGE ...`: one entry point per pipeline stage.

Every stage reads `--params` (default params.yaml) plus `--set key=value` overrides,
validates them once into a typed Config, and only then touches the disk.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable, Sequence

from amoc import config as config_mod
from amoc.errors import AmocError
from amoc.io import disk_full_error

# stage -> (module:function, help, function that adds the stage's own arguments)
STAGES: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {}
DEFAULT_PARAMS = "params.yaml"


def _stage(name: str, target: str, help_text: str):
    def register(add_args: Callable[[argparse.ArgumentParser], None]):
        STAGES[name] = (target, help_text, add_args)
        return add_args

    return register


@_stage("download", "amoc.data.stage:run", "fetch, verify and unpack a data set into compact uint8 arrays")
def _download_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="data/prepared", help="output folder: train.npz, test.npz, stats.json (default: %(default)s)"
    )


@_stage("pretrain", "amoc.pretrain.stage:run", "AMOC pre-training of the query encoder (no labels)")
def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/prepared", help="folder written by `amoc download` (default: %(default)s)")
    p.add_argument(
        "--out",
        default="runs/pretrain",
        help="output folder: encoder.pt, checkpoints/, log.csv, metrics.json, summary.json (default: %(default)s)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest good checkpoint in OUT/checkpoints if its config matches",
    )


@_stage(
    "import-encoder",
    "amoc.pretrain.imported:run",
    "convert a released encoder (the AMOC authors', ACL's, DynACL's) into amoc's encoder format",
)
def _import_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="layout",
        choices=("authors", "acl", "dynacl"),
        required=True,
        help="the file's layout: authors (MTandHJ/amoc paras.pt), acl (VITA-Group ACL_DS), dynacl (PKU-ML DynACL)",
    )
    p.add_argument("file", help="the released checkpoint (.pt / .pth)")
    p.add_argument(
        "--out", default="runs/pretrain/encoder.pt", help="amoc encoder file to write (default: %(default)s)"
    )
    p.add_argument(
        "--bn-branch",
        choices=("adv", "clean"),
        default="adv",
        help="BN branch downstream stages use (default: %(default)s; clean for the authors' CCC/CAC/CAA models)",
    )
    p.add_argument(
        "--dataset",
        choices=("cifar10", "cifar100"),
        default="cifar10",
        help="authors layout: the data set whose mean/std their code normalises with (default: %(default)s)",
    )
    p.add_argument("--sha256", default=None, help="refuse the file unless its sha256 is this")


@_stage("probe", "amoc.downstream.probe:run", "linear probing of a frozen encoder: SLF (clean) or ALF (adversarial)")
def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode", choices=("slf", "alf"), required=True, help="slf: cross-entropy on clean images; alf: TRADES / PGD-AT"
    )
    p.add_argument(
        "--encoder",
        default="runs/pretrain/encoder.pt",
        help="encoder written by `amoc pretrain` (default: %(default)s)",
    )
    p.add_argument("--data", default="data/prepared", help="folder written by `amoc download` (default: %(default)s)")
    p.add_argument(
        "--out", required=True, help="output folder: classifier.pt, classifier_best.pt, log.csv, summary.json"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints if its config matches")


@_stage("finetune", "amoc.downstream.finetune:run", "adversarial full fine-tuning (AFF), or the from-scratch baseline")
def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--init",
        default="runs/pretrain/encoder.pt",
        help="encoder to start from, or 'scratch' for a random init (default: %(default)s)",
    )
    p.add_argument("--data", default="data/prepared", help="folder written by `amoc download` (default: %(default)s)")
    p.add_argument(
        "--out", required=True, help="output folder: classifier.pt, classifier_best.pt, log.csv, summary.json"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints if its config matches")


@_stage("evaluate", "amoc.evaluate.stage:run", "clean, PGD-20 and AutoAttack accuracy plus a robustness curve")
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="classifier.pt written by `amoc probe` or `amoc finetune`")
    p.add_argument("--data", default="data/prepared", help="folder written by `amoc download` (default: %(default)s)")
    p.add_argument(
        "--out",
        required=True,
        help="output folder: metrics.json, eval.json, curve.csv (with --corruptions: metrics.json, "
        "corruptions.json, corruptions.csv, severity.csv)",
    )
    p.add_argument(
        "--corruptions",
        default=None,
        metavar="DIR",
        help="instead of attacks, score accuracy on the corrupted test sets in DIR (written by `amoc corruptions`)",
    )


@_stage(
    "robustbench",
    "amoc.evaluate.robustbench:run",
    "write RobustBench's model-info JSON (as benchmark(to_disk=True) does) from a full-test-set evaluation",
)
def _robustbench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval", required=True, help="the folder of `amoc evaluate`'s eval.json, e.g. runs/aff/eval")
    p.add_argument("--data", default="data/prepared", help="folder written by `amoc download` (default: %(default)s)")
    p.add_argument("--name", required=True, help="RobustBench's model name, <Name><Year><FirstWordOfTheTitle>")
    p.add_argument("--out", default="model_info", help="writes OUT/<dataset>/Linf/NAME.json (default: %(default)s)")


@_stage(
    "corruptions",
    "amoc.robustness.corruptions:run",
    "CIFAR-10-C / CIFAR-100-C: fetch the official set, or generate an offline approximation",
)
def _corruptions_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/prepared", help="folder written by `amoc download` (default: %(default)s)")
    p.add_argument(
        "--out",
        default="data/corrupted",
        help="output folder: <corruption>.npy, labels.npy, source.json (default: %(default)s)",
    )


@_stage(
    "transfer",
    "amoc.robustness.transfer:run",
    "black-box transfer: PGD examples from source models scored on every model",
)
def _transfer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", default="runs", help="folder holding <model>/classifier.pt (default: %(default)s)")
    p.add_argument(
        "--models", nargs="+", default=["slf", "alf", "aff", "scratch"], help="target models (default: %(default)s)"
    )
    p.add_argument("--data", default="data/prepared", help="folder written by `amoc download` (default: %(default)s)")
    p.add_argument(
        "--out",
        default="runs/transfer",
        help="output folder: metrics.json, transfer.json, transfer.csv (default: %(default)s)",
    )


@_stage("report", "amoc.report.stage:run", "collect every metrics file into a markdown table and seaborn figures")
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", default="runs", help="folder holding the stage outputs (default: %(default)s)")
    p.add_argument("--out", default="report", help="output folder: report.md and PNG figures (default: %(default)s)")


@_stage("compare", "amoc.report.compare:run", "DVC experiments as configurations: mean +- sd over seeds, a figure")
def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiments", nargs="*", help="experiment names or revs (default: every finished experiment)")
    p.add_argument("--workspace", default=".", help="the DVC project holding the experiments (default: %(default)s)")
    p.add_argument(
        "--metrics",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="metrics to show, as globs: 'alf.*' 'pretrain.knn_acc'",
    )
    p.add_argument(
        "--seed-key", default="seed", help="the param that varies within a configuration (default: %(default)s)"
    )
    p.add_argument(
        "--baseline", default=None, help="a configuration to subtract: differences, their standard error and Welch's p"
    )
    p.add_argument("--figure", default=None, help="also write a PNG: per-seed points over mean +- sd bars")
    p.add_argument("--out", default="-", help="markdown file to write (default: stdout)")


@_stage("params", "amoc.presets:run", "print the validated params (optionally a preset) as YAML")
def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="apply a bundled preset on top: " + ", ".join(_preset_names()))
    p.add_argument("--out", default="-", help="file to write (default: stdout)")


def _preset_names() -> list[str]:
    from amoc.presets import available

    return available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amoc",
        description="Adversarial Momentum-Contrastive pre-training (AMOC): robust self-supervised "
        "encoders and their robustness evaluation. Each subcommand is one pipeline stage.",
        epilog="Run `amoc STAGE --help` for a stage's options. Stages are chained by dvc.yaml / the Snakefile.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    sub.required = True
    for name, (_, help_text, add_args) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a param, e.g. --set queue_size=4096 --set pretrain.epochs=5 (repeatable)",
        )
        add_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target, _, _ = STAGES[args.stage]
    try:
        preset = None
        if getattr(args, "preset", None):  # `amoc params --preset NAME`: the preset, then --set on top
            from amoc.presets import overrides as preset_overrides

            preset = preset_overrides(args.preset)
        params = args.params
        if (
            args.stage in ("params", "import-encoder", "compare")
            and params == DEFAULT_PARAMS
            and not Path(params).exists()
        ):
            # a workspace from nothing: `amoc params [--preset X] --out params.yaml` anywhere;
            # `amoc import-encoder` and `amoc compare` read no param, so they run anywhere too
            if args.stage == "params":
                print("amoc params: no params.yaml here; starting from the package's defaults", file=sys.stderr)
            params = None
        cfg = config_mod.load(params, args.overrides, preset=preset)
        module_name, func_name = target.split(":")
        module = importlib.import_module(module_name)
        result = getattr(module, func_name)(cfg, args)
        return int(result or 0)
    except AmocError as exc:
        print(f"amoc {args.stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a full disk outside amoc.io's writers (a folder, a temp dir): one line too
        error = disk_full_error(exc, exc.filename or getattr(args, "out", None))
        if error is None:
            raise
        print(f"amoc {args.stage}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"amoc {args.stage}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
