"""`amoc evaluate --corruptions DIR`: accuracy under every corruption and severity.

The classifier (`load_classifier`: images in [0, 1], eval mode, adversarial BN)
runs in fp32, batched (evaluate.batch_size), on the runtime's device. Clean accuracy is
measured on the same test images: the first N of --data, which must be the images the
set was built from (same labels; for a generated set also the same pixels, by hash).

Metrics (accuracy in %): per corruption x severity; per corruption (mean over
severities); mean corruption accuracy (mean over all cells); clean accuracy; relative
drop = (clean - mean corruption) / clean, a fraction. Outputs, all atomic:
OUT/metrics.json (the headline: mean corruption accuracy and relative drop),
OUT/corruptions.json (everything), OUT/corruptions.csv (corruption, severity, accuracy)
and OUT/severity.csv (severity 0 = clean, mean accuracy: a DVC plot).
"""

from __future__ import annotations

import csv
import hashlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from amoc.attacks.accuracy import correct
from amoc.config import Config
from amoc.data import corrupted as layout
from amoc.data.prepared import load_split
from amoc.errors import DataError
from amoc.io import RunLock, write_json, write_text
from amoc.nets.classifier import read_checked
from amoc.runtime import Runtime, setup

CSV_COLUMNS = ("corruption", "severity", "accuracy")
SEVERITY_COLUMNS = ("severity", "accuracy")


def score(
    model: nn.Module,
    cset: layout.CorruptedSet,
    clean_x: torch.Tensor,
    clean_y: torch.Tensor,
    rt: Runtime,
    batch_size: int,
) -> dict[str, Any]:
    """Accuracies (%) of `model` on a corrupted set and on its N clean images (N x 3 x H x W)."""
    n = cset.n_images
    pct = lambda correct: 100.0 * correct / n  # noqa: E731
    clean = pct(int(correct(model, clean_x, clean_y, rt, batch_size).sum()))
    cells = {
        name: {
            s: pct(
                int(correct(model, cset.images(name, s), cset.severity_labels(s), rt, batch_size, layout="NHWC").sum())
            )
            for s in cset.severities
        }
        for name in cset.names
    }
    per_corruption = {name: float(np.mean(list(row.values()))) for name, row in cells.items()}
    per_severity = {s: float(np.mean([cells[name][s] for name in cset.names])) for s in cset.severities}
    mean_c = float(np.mean([v for row in cells.values() for v in row.values()]))
    return {
        "clean_acc": clean,
        "mean_corruption_acc": mean_c,
        "relative_drop": (clean - mean_c) / clean if clean > 0 else None,
        "per_corruption": per_corruption,
        "per_severity": per_severity,
        "cells": cells,
    }


def clean_images(data: str | Path, cset: layout.CorruptedSet) -> tuple[torch.Tensor, torch.Tensor]:
    """The first N prepared test images, checked to be those the corrupted set was built from."""
    x, y = load_split(data, "test")
    n = cset.n_images
    if len(x) < n:
        raise DataError(
            f"{data}: the test split has {len(x)} images but {cset.folder} was built from {n}; prepare the "
            "matching test split or rebuild the set with a smaller corruptions.n_images"
        )
    x, y = x[:n], y[:n]
    if not np.array_equal(y.numpy(), cset.severity_labels(cset.severities[0])):
        raise DataError(
            f"{cset.folder}: its labels differ from the first {n} test labels in {data}; it was built from "
            f"other test images - rebuild it with `amoc corruptions --data {data}`"
        )
    expected = cset.info.get("clean_sha256")
    if expected and hashlib.sha256(x.numpy().tobytes()).hexdigest() != expected:
        raise DataError(
            f"{cset.folder}: generated from other test images than those in {data} (pixel hash differs); "
            f"rebuild it with `amoc corruptions --data {data}`"
        )
    return x, y


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def run(cfg: Config, args: Any) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    cset = layout.read(args.corruptions)
    with RunLock(out):
        rt = setup(cfg.runtime, cfg.seed, stage="evaluate --corruptions", evaluation=True)
        model = rt.prepare(read_checked(args.model, cfg, args.data)[0]).eval().requires_grad_(False)
        x, y = clean_images(args.data, cset)
        res = score(model, cset, x, y, rt, cfg.evaluate.batch_size)
        report = {
            "kind": cset.kind,
            "dataset": cset.info.get("dataset"),
            "note": cset.info.get("note"),
            "n_images": cset.n_images,
            "precision": "fp32, TF32 off",
            "names": cset.names,
            "severities": cset.severities,
            "metrics": {
                "clean_acc": _r(res["clean_acc"]),
                "mean_corruption_acc": _r(res["mean_corruption_acc"]),
                "relative_drop": _r(res["relative_drop"], 4),
                "per_corruption": {k: _r(v) for k, v in res["per_corruption"].items()},
                "per_severity": {str(k): _r(v) for k, v in res["per_severity"].items()},
            },
            "accuracy": {name: {str(s): _r(v) for s, v in row.items()} for name, row in res["cells"].items()},
            "units": {"accuracy": "% of n_images", "relative_drop": "(clean - mean corruption) / clean, a fraction"},
            "model": str(args.model),
            "corruptions": str(args.corruptions),
            "seconds": round(time.perf_counter() - start, 1),
        }
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for name, row in res["cells"].items():
            for s, acc in row.items():
                writer.writerow([name, s, f"{acc:.2f}"])
        write_text(out / "corruptions.csv", buf.getvalue())
        curve = [(0, res["clean_acc"])] + sorted(res["per_severity"].items())
        write_text(
            out / "severity.csv", ",".join(SEVERITY_COLUMNS) + "\n" + "".join(f"{s},{acc:.2f}\n" for s, acc in curve)
        )
        write_json(out / "corruptions.json", report)
        m = report["metrics"]
        write_json(out / "metrics.json", {"mean_acc": m["mean_corruption_acc"], "relative_drop": m["relative_drop"]})
    m = report["metrics"]
    print(
        f"amoc evaluate: {cset.kind} corruptions, {cset.n_images:,} images: clean {m['clean_acc']:.2f}%, "
        f"mean corruption {m['mean_corruption_acc']:.2f}%, relative drop {m['relative_drop']} -> {out} "
        f"({report['seconds']:.1f} s)"
    )
    return 0
