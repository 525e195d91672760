"""Report pieces for corruption robustness and transfer attacks (called by `amoc report`).

- corruption_heatmaps(runs, out) -> [PNG]: per model a corruption x severity heat-map of
  runs/<model>/corruptions/corruptions.csv, plus one figure comparing the models.
- transfer_heatmap(runs, out) -> PNG | None: runs/transfer/transfer.json as a heat-map.
- markdown_sections(runs) -> str: the same numbers as markdown tables.

Every title says which corrupted set was used; a generated set is called a generated
approximation, never CIFAR-10-C. Figures use the Agg backend and are written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from amoc.config import CORRUPTIONS
from amoc.report.render import fmt, save_png

KIND_LABELS = {
    "generated-approximation": "generated approximation (not the official CIFAR-10-C)",
    "official": "official",
    "custom-archive": "user-supplied *-C archive",
}
TRANSFER_DIR = "transfer"


def _set_label(report: dict[str, Any]) -> str:
    kind = report.get("kind", "?")
    if kind == "official":
        return f"official {report.get('dataset') or '*-C'}"
    return KIND_LABELS.get(kind, str(kind))


def load_corruption_runs(runs_dir: str | os.PathLike) -> dict[str, tuple[pd.DataFrame, dict[str, Any]]]:
    """model -> (rows of corruptions.csv, corruptions.json), for runs/<model>/corruptions/."""
    found = {}
    root = Path(runs_dir)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        csv_path, json_path = folder / "corruptions" / "corruptions.csv", folder / "corruptions" / "corruptions.json"
        if csv_path.is_file() and json_path.is_file():
            found[folder.name] = (pd.read_csv(csv_path), json.loads(json_path.read_text()))
    return found


def load_transfer(runs_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(runs_dir) / TRANSFER_DIR / "transfer.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _grid(rows: pd.DataFrame) -> pd.DataFrame:
    grid = rows.pivot(index="corruption", columns="severity", values="accuracy")
    order = [c for c in CORRUPTIONS if c in grid.index] + [c for c in grid.index if c not in CORRUPTIONS]
    return grid.loc[order]


def _seaborn():
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns
    from matplotlib.figure import Figure

    return sns, Figure


def corruption_heatmaps(runs_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    sns, Figure = _seaborn()
    out, runs, paths = Path(out_dir), load_corruption_runs(runs_dir), []
    for model, (rows, report) in runs.items():
        grid = _grid(rows)
        fig = Figure(figsize=(1.1 * grid.shape[1] + 3.5, 0.42 * grid.shape[0] + 1.8))
        ax = fig.subplots()
        sns.heatmap(
            grid, annot=True, fmt=".1f", vmin=0, vmax=100, cmap="viridis", ax=ax, cbar_kws={"label": "accuracy (%)"}
        )
        m = report.get("metrics", {})
        ax.set_title(
            f"{model}: accuracy under corruptions, {_set_label(report)}\n"
            f"{report.get('n_images')} test images; clean {m.get('clean_acc')}%, "
            f"mean corruption {m.get('mean_corruption_acc')}%",
            fontsize=9,
        )
        ax.set_xlabel("severity")
        ax.set_ylabel("corruption")
        paths.append(save_png(fig, out / f"corruptions_{model}.png"))
    if runs:
        paths.append(_comparison(runs, out, sns, Figure))
    return paths


def _comparison(runs: dict[str, tuple[pd.DataFrame, dict[str, Any]]], out: Path, sns, Figure) -> Path:
    bars, lines = [], []
    for model, (_, report) in runs.items():
        m = report.get("metrics", {})
        bars += [
            {"model": model, "metric": "clean", "accuracy": m.get("clean_acc")},
            {"model": model, "metric": "mean corruption", "accuracy": m.get("mean_corruption_acc")},
        ]
        lines.append({"model": model, "severity": 0, "accuracy": m.get("clean_acc")})
        lines += [{"model": model, "severity": int(s), "accuracy": v} for s, v in m.get("per_severity", {}).items()]
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    bars = pd.DataFrame(bars)
    sns.barplot(bars, x="model", y="accuracy", hue="metric", ax=left)
    for container in left.containers:
        left.bar_label(container, fmt="%.1f", fontsize=8)
    left.set_ylim(0, min(110.0, 1.25 * float(bars["accuracy"].max() or 1.0)))  # room for the legend
    left.set_title("Clean vs mean corruption accuracy")
    left.set_xlabel("model")
    left.set_ylabel("accuracy (%)")
    left.legend(title="")
    sns.lineplot(pd.DataFrame(lines), x="severity", y="accuracy", hue="model", marker="o", ax=right)
    right.set_title("Mean accuracy over corruptions by severity (0 = clean)")
    right.set_xlabel("severity")
    right.set_ylabel("accuracy (%)")
    labels = sorted({_set_label(r) for _, r in runs.values()})
    fig.suptitle(f"Corruption robustness: {'; '.join(labels)}", fontsize=10)
    return save_png(fig, out / "corruptions_comparison.png")


def transfer_heatmap(runs_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path | None:
    report = load_transfer(runs_dir)
    if report is None:
        return None
    sns, Figure = _seaborn()
    grid, targets = _transfer_grid(report)
    fig = Figure(figsize=(1.3 * len(targets) + 3.5, 0.6 * len(grid) + 2))
    ax = fig.subplots()
    sns.heatmap(
        grid,
        annot=True,
        fmt=".1f",
        vmin=0,
        vmax=100,
        cmap="magma",
        ax=ax,
        cbar_kws={"label": "robust accuracy (%): correct clean and attacked"},
    )
    a = report["attack"]
    ax.set_title(
        f"Transfer PGD-{a['steps']} (L-inf eps {a['eps_255']:g}/255), {report['n_images']} test images\n"
        "rows: model the examples were crafted on; columns: model scored; * = suspect gradient masking",
        fontsize=9,
    )
    ax.set_xlabel("target model")
    ax.set_ylabel("source model")
    ax.tick_params(axis="y", labelrotation=0)
    return save_png(fig, Path(out_dir) / "transfer.png")


def _transfer_grid(report: dict[str, Any]) -> tuple[pd.DataFrame, list[str]]:
    targets = list(report["targets"])
    rows = {s: [report["matrix"][s].get(t) for t in targets] for s in report["sources"]}
    rows["white-box"] = [report["models"][t]["whitebox_acc"] for t in targets]
    names = [t + (" *" if report["models"][t].get("suspect_gradient_masking") else "") for t in targets]
    return pd.DataFrame.from_dict(rows, orient="index", columns=names).astype(float), targets


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def markdown_sections(runs_dir: str | os.PathLike) -> str:
    parts = []
    runs = load_corruption_runs(runs_dir)
    if runs:
        parts.append("## Common corruptions\n")
        if any(r.get("kind") != "official" for _, r in runs.values()):
            parts.append(
                "**Not the official benchmark:** at least one set below is a generated approximation or a "
                "user archive; do not compare its numbers with published CIFAR-10-C / CIFAR-100-C results.\n"
            )
        parts.append(
            "| model | set | images | clean (%) | mean corruption (%) | relative drop (% of clean) |\n"
            "|---|---|---|---|---|---|"
        )
        for model, (_, r) in runs.items():
            m = r.get("metrics", {})
            parts.append(
                f"| {model} | {_set_label(r)} | {r.get('n_images')} | {fmt(m.get('clean_acc'))} | "
                f"{fmt(m.get('mean_corruption_acc'))} | {fmt(_pct(m.get('relative_drop')))} |"
            )
        parts.append("")
        for model, (rows, r) in runs.items():
            grid = _grid(rows)
            cols = list(grid.columns)
            parts.append(f"### {model}: accuracy (%), {_set_label(r)}\n")
            parts.append("| corruption | " + " | ".join(f"s{c}" for c in cols) + " | mean |")
            parts.append("|---" * (len(cols) + 2) + "|")
            for name, values in grid.iterrows():
                parts.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {values.mean():.2f} |")
            parts.append("")
    report = load_transfer(runs_dir)
    if report is not None:
        a = report["attack"]
        grid, targets = _transfer_grid(report)
        parts.append("## Transfer attacks\n")
        parts.append(
            f"PGD-{a['steps']}, L-inf eps {a['eps_255']:g}/255, step {a['step_255']:g}/255, cross-entropy, "
            f"seed {a['seed']}, {report['n_images']} test images. Rows: model the examples were crafted on; "
            "columns: model scored (accuracy %, the diagonal is white-box).\n"
        )
        parts.append("| source \\ target | " + " | ".join(grid.columns) + " |")
        parts.append("|---" * (len(targets) + 1) + "|")
        for source, values in grid.iterrows():
            parts.append(f"| {source} | " + " | ".join(fmt(v) for v in values) + " |")
        parts.append(
            f"\nGradient-masking check (flag: white-box accuracy above the best transfer accuracy by more "
            f"than {report['margin_pp']:g} points):\n"
        )
        parts.append(
            "| model | clean (%) | white-box (%) | best transfer (%) | from | gap (points) | suspect masking |"
        )
        parts.append("|---|---|---|---|---|---|---|")
        for t in targets:
            m = report["models"][t]
            flag = {True: "**yes**", False: "no", None: "n/a"}[m.get("suspect_gradient_masking")]
            parts.append(
                f"| {t} | {fmt(m.get('clean_acc'))} | {fmt(m.get('whitebox_acc'))} | "
                f"{fmt(m.get('best_transfer_acc'))} | {m.get('best_transfer_source') or 'n/a'} | "
                f"{fmt(m.get('gap_pp'))} | {flag} |"
            )
        parts.append("")
    return "\n".join(parts)
