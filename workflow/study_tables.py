"""The tables of docs/results.md, from a finished `make study` workspace.

    python workflow/study_tables.py study/ [--seconds N] > study/results.md

Reads the experiments' files from git (`dvc exp show --json` names each experiment's
commit; its metrics, summaries and logs are `cache: false` files git keeps) and prints
markdown: pre-training (loss against log(K+1), k-NN against the random-init encoder, per
epoch), the linear probes and the fine-tuned models (clean, PGD-20, AutoAttack; last and
best-on-validation epoch), and what each stage cost.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from amoc.report.compare import git_show, read_workspace

EXPERIMENTS = ("aca-plus", "aca", "ccc", "aca-plus-moco")


def experiments(ws: Path) -> dict[str, str]:
    """name -> commit of every experiment in `dvc exp show --json` (the newest of a name)."""
    return {e.name: e.rev for e in read_workspace(ws) if e.rev != "workspace"}


def load(ws: Path, rev: str, path: str) -> Any:
    text = git_show(ws, rev, path)
    if text is None:
        return None
    return json.loads(text) if path.endswith(".json") else list(csv.DictReader(io.StringIO(text)))


def pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}" if value <= 1 else f"{value:.1f}"


def num(value: Any, digits: int = 2) -> str:
    return "n/a" if value in (None, "") else f"{float(value):.{digits}f}"


def minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--seconds", type=int, default=None, help="wall-clock seconds of the whole study")
    args = ap.parse_args()
    ws = args.workspace
    revs = experiments(ws)
    out = []
    out.append("### Pre-training\n")
    out.append(
        "| experiment | variant | enqueue order | epochs | final loss | log(K+1) | k-NN (%) | random-init k-NN (%) "
        "| k-NN per epoch (%) | pre-training min |"
    )
    out.append("|---|---|---|---:|---:|---:|---:|---:|---|---:|")
    for name in EXPERIMENTS:
        rev = revs.get(name)
        s = load(ws, rev, "runs/pretrain/summary.json") if rev else None
        log = load(ws, rev, "runs/pretrain/log.csv") if rev else None
        if s is None:
            out.append(f"| {name} | (missing) |||||||||")
            continue
        curve = ", ".join(pct(float(r["knn_acc"])) for r in log or [] if r.get("knn_acc"))
        order = "moco" if name.endswith("moco") else "authors"
        out.append(
            f"| {name} | {s['variant']} | {order} | {s['epochs']} | {num(s['loss'], 3)} | {num(s['log_k_plus_1'], 3)} "
            f"| {pct(s['knn_acc'])} | {pct(s['knn_random_acc'])} | {curve} | {minutes(s.get('seconds'))} |"
        )
    n_aa: set = set()
    out.append(
        "\n### Downstream models (test set: clean and PGD-20 on every test image; AutoAttack on the first "
        "N_AA, with the clean accuracy on those same images in brackets)\n"
    )
    out.append(
        "| experiment | model | epoch | clean (%) | PGD-20 (%) | AutoAttack (%) [clean] | best epoch on validation "
        "| clean (%) | PGD-20 (%) | AutoAttack (%) [clean] | training min |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in EXPERIMENTS:
        rev = revs.get(name)
        for model in ("slf", "alf", "aff", "scratch"):
            ev = load(ws, rev, f"runs/{model}/eval/eval.json") if rev else None
            if ev is None:
                continue
            tr = load(ws, rev, f"runs/{model}/summary.json") or {}
            b = ev.get("best") or {}
            label = {"slf": "SLF", "alf": "ALF", "aff": "AFF", "scratch": "TRADES from scratch"}[model]
            same = " (= last)" if b.get("same_as_last") else ""
            sub, bsub = ev.get("subset") or {}, b.get("subset") or {}
            n_aa.add(sub.get("n_images"))
            out.append(
                f"| {name} | {label} | {ev.get('epoch')} | {num(ev['clean_acc'])} | {num(ev['pgd_acc'])} "
                f"| {num(ev['autoattack_acc'])} [{num(sub.get('clean_acc'))}] | {b.get('epoch', 'n/a')}{same} "
                f"| {num(b.get('clean_acc'))} | {num(b.get('pgd_acc'))} | {num(b.get('autoattack_acc'))} "
                f"[{num(bsub.get('clean_acc'))}] | {minutes(tr.get('seconds'))} |"
            )
    out = [line.replace("N_AA", ", ".join(str(n) for n in sorted(n_aa - {None})) or "?") for line in out]
    if args.seconds is not None:
        out.append(f"\nThe whole study took {args.seconds // 60} min {args.seconds % 60:02d} s of wall clock.")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
