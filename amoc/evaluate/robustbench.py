"""`amoc robustbench`: the model-info JSON that RobustBench's `benchmark(..., to_disk=True)`
writes, from an `amoc evaluate` run on the full test set (docs/robustbench.md).

RobustBench (robustbench 1.1.1, `robustbench/utils.py`: `update_json`, `ModelInfo`)
writes `model_info/<dataset>/<threat model>/<name>.json` with every `ModelInfo` field:
`clean_acc` and `autoattack_acc` as strings, `str(round(accuracy * 100, 2))` of the
fraction correct, `dataset` and `eps`, and null for the rest. This file has the same
fields in the same order; amoc also fills what it knows (architecture, one forward pass
per prediction, eps as RobustBench's own files write it, "8/255"), and leaves for the
submitter what only they know: link, name, authors, additional_data, venue, reported,
footnote. It is written only for a standard AutoAttack (L-inf, 100 iterations, Square
5000 queries, 9 target classes) on every test image, as `benchmark()` runs it.
"""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

from amoc.config import Config
from amoc.data.prepared import load_split, load_stats
from amoc.errors import DataError
from amoc.io import write_text
from amoc.nets.classifier import read_classifier

# robustbench.utils.ModelInfo's fields, in its order
FIELDS = (
    "link",
    "name",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "corruptions_acc",
    "corruptions_acc_3d",
    "corruptions_mce",
    "corruptions_mce_3d",
    "autoattack_acc",
    "footnote",
)
FOR_THE_SUBMITTER = ("link", "name", "authors", "additional_data", "venue", "reported", "footnote")
DATASETS = ("cifar10", "cifar100", "imagenet")  # RobustBench's BenchmarkDataset


def rb_accuracy(acc_pct: float, n: int) -> str:
    """RobustBench's string of an accuracy: str(round(correct / n * 100, 2)), from the
    percentage eval.json holds (rounded to 0.01, so it identifies the count for n <= 10,000)."""
    correct = round(acc_pct * n / 100)
    return str(round(correct / n * 100, 2))


def eps_text(eps: float) -> str | float:
    """'8/255' as RobustBench's model_info files write it, when eps is k/255."""
    k = Fraction(eps * 255).limit_denominator(1000)
    return f"{k.numerator}/255" if k.denominator == 1 and abs(k - eps * 255) < 1e-6 else eps


def _standard(aa: dict[str, Any], num_classes: int) -> list[str]:
    """How the recorded AutoAttack differs from the standard one benchmark() runs."""
    diffs = []
    if aa.get("version") != "standard" or aa.get("norm") != "Linf":
        diffs.append(f"version {aa.get('version')} {aa.get('norm')}")
    if aa.get("iterations") != 100:
        diffs.append(f"{aa.get('iterations')} iterations (standard: 100)")
    if aa.get("square_queries") != 5000:
        diffs.append(f"Square {aa.get('square_queries')} queries (standard: 5000)")
    if aa.get("square_rescale_schedule"):
        diffs.append("Square's rescaled schedule")
    if aa.get("n_target_classes") != min(9, num_classes - 1):
        diffs.append(f"{aa.get('n_target_classes')} target classes")
    return diffs


def model_info(eval_dir: Path, data: Path) -> tuple[dict[str, Any], str]:
    """(the model-info dict, the data set's name) from `amoc evaluate`'s eval.json."""
    path = eval_dir / "eval.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; run `amoc evaluate --out {eval_dir}` first")
    try:
        result = json.loads(path.read_text())
        aa, n, n_aa = result["settings"]["autoattack"], result["n_images"], result["settings"]["autoattack"]["n_images"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}: not an eval.json written by `amoc evaluate`; run it again") from None
    stats = load_stats(data)
    _, y = load_split(data, "test")
    n_test, num_classes = len(y), int(stats.get("num_classes", int(y.max()) + 1))
    if not aa.get("enabled") or result.get("autoattack_acc") is None:
        raise DataError(f"{path}: ran without AutoAttack; rerun `amoc evaluate` with evaluate.autoattack=true")
    if n != n_test or n_aa != n_test:
        raise DataError(
            f"{path}: clean accuracy on {n} and AutoAttack on {n_aa} of the {n_test} test images; RobustBench "
            "reports the full test set: rerun with --set evaluate.n_images=0 --set evaluate.autoattack_images=0"
        )
    diffs = _standard(aa, num_classes)
    if diffs:
        raise DataError(
            f"{path}: not the standard AutoAttack RobustBench runs ({', '.join(diffs)}); rerun `amoc evaluate` "
            "with this version's defaults"
        )
    model, _ = read_classifier(result["settings"]["model"])
    width = model.encoder.width
    name = stats.get("name") or "unknown"
    info: dict[str, Any] = dict.fromkeys(FIELDS)
    info.update(
        number_forward_passes=1,
        dataset=name,
        architecture="ResNet-18" if width == 1.0 else f"ResNet-18 (width {width:g})",
        eps=eps_text(aa["eps"]),
        clean_acc=rb_accuracy(result["clean_acc"], n),
        autoattack_acc=rb_accuracy(result["autoattack_acc"], n),
    )
    return info, name


def run(cfg: Config, args: argparse.Namespace) -> int:
    eval_dir, data = Path(args.eval), Path(args.data)
    info, dataset = model_info(eval_dir, data)
    out = Path(args.out) / dataset / "Linf" / f"{args.name}.json"
    write_text(out, json.dumps(info, indent=2) + "\n")
    recorded = json.loads((eval_dir / "eval.json").read_text())["settings"]["autoattack"].get("library", "?")
    print(
        f"amoc robustbench: {out}: clean {info['clean_acc']} %, AutoAttack {info['autoattack_acc']} % "
        f"(eps {info['eps']}, Linf, {recorded}); fill in {', '.join(FOR_THE_SUBMITTER)} before submitting"
    )
    if dataset not in DATASETS:
        print(f"amoc robustbench: note: RobustBench's leaderboards take {', '.join(DATASETS)}; this is {dataset}")
    return 0
