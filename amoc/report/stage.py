"""`amoc report`: every metrics file under --runs as one markdown table plus figures.

Reads runs/pretrain*/metrics.json + log.csv (pre-training) and the eval.json + curve.csv
of every downstream model: runs/<model>/ or runs/<model>/eval/ (the pipeline's layout) for
slf, alf, aff and scratch, and any other folder up to two levels down holding an eval.json. A missing
or unreadable input drops that row or figure with a note in the report; it never fails
the stage, so a report of a partial run is always possible.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from amoc.config import METHOD_NAMES, Config
from amoc.io import RunLock, write_text
from amoc.report import robustness as robustness_plots
from amoc.report.render import fmt, save_png

MODELS = {"slf": "SLF", "alf": "ALF", "aff": "AFF", "scratch": "scratch"}
LOSS_NAMES = {"trades": "TRADES", "pgd_at": "PGD-AT", "ce": "CE"}
METRICS = (("clean_acc", "clean"), ("pgd_acc", "PGD-20"), ("autoattack_acc", "AutoAttack"))


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"`{path}` is unreadable ({type(exc).__name__}); skipped.")
        return None
    if not isinstance(data, dict):
        notes.append(f"`{path}` is not a JSON object; skipped.")
        return None
    return data


def _read_csv(path: Path, notes: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as exc:  # pandas' parser errors are ValueErrors
        notes.append(f"`{path}` is unreadable ({type(exc).__name__}); skipped.")
        return None


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _pct_knn(value: Any) -> float | None:
    """k-NN accuracy in %: `amoc pretrain` records a fraction in [0, 1]."""
    v = _num(value)
    return None if v is None else (100 * v if v <= 1.0 else v)


# --------------------------------------------------------------------------- collection
def collect_pretrain(runs: Path, notes: list[str]) -> list[dict[str, Any]]:
    found = []
    for folder in sorted(p for p in runs.glob("pretrain*") if p.is_dir()):
        summary = _read_json(folder / "summary.json", notes)
        log = _read_csv(folder / "log.csv", notes)
        if summary is None and log is None:
            notes.append(f"`{folder}` has neither summary.json nor log.csv; skipped.")
            continue
        m = summary or {}
        knn = _pct_knn(m.get("knn_acc"))
        if knn is None and log is not None and "knn_acc" in log:
            knn = _pct_knn(log["knn_acc"].dropna().iloc[-1]) if log["knn_acc"].notna().any() else None
        found.append(
            {
                "run": folder.name,
                "method": METHOD_NAMES.get(m.get("method", "amoc"), m.get("method")),  # older summaries: AMOC
                "variant": m.get("variant") or "-",
                "queue_size": m.get("queue_size"),
                "epochs": m.get("epochs", None if log is None else len(log)),
                "knn_acc": knn,
                "knn_random_acc": _pct_knn(m.get("knn_random_acc")),
                "knn_random_bn_acc": _pct_knn(m.get("knn_random_bn_acc")),
                "loss": _num(m.get("loss")),
                "chance": _num(m.get("chance_loss", m.get("log_k_plus_1"))),
                "chance_label": m.get("chance_label", "log(K+1)"),
                "log": log,
            }
        )
    return found


def _model_label(name: str, metrics: dict[str, Any] | None, short: bool = False) -> str:
    if name == "scratch":
        loss = LOSS_NAMES.get((metrics or {}).get("loss_fn", "trades"), "TRADES")
        return f"scratch ({loss})" if short else f"scratch ({loss} from scratch)"
    return MODELS.get(name, name)


def pgd_name(models: list[dict[str, Any]]) -> str:
    """ "PGD-20" when every model was evaluated with the same number of steps, else "PGD"."""
    steps = {((m["eval"].get("settings") or {}).get("pgd") or {}).get("steps") for m in models}
    return f"PGD-{steps.pop()}" if len(steps) == 1 and None not in steps else "PGD"


def _eval_folders(runs: Path) -> dict[str, Path]:
    """model name -> folder holding its eval.json: runs/<m>/ or runs/<m>/eval/ (the
    pipeline's layout) for the known models, and any other folder up to two levels down."""
    found: dict[str, Path] = {}
    for path in sorted(runs.glob("*/eval.json")) + sorted(runs.glob("*/*/eval.json")):
        rel = path.parent.relative_to(runs).parts
        if rel[0].startswith("pretrain"):
            continue
        name = rel[0] if len(rel) == 1 or rel[1] == "eval" else "/".join(rel)
        found.setdefault(name, path.parent)
    return found


def collect_models(runs: Path, notes: list[str]) -> list[dict[str, Any]]:
    folders = _eval_folders(runs)
    names = list(MODELS) + sorted(n for n in folders if n not in MODELS)
    found = []
    for name in names:
        train = _read_json(runs / name / "summary.json", notes)
        folder = folders.get(name)
        ev = None if folder is None else _read_json(folder / "eval.json", notes)
        if ev is None:
            if name in MODELS and folder is None:
                notes.append(
                    f"{_model_label(name, train)}: no eval.json in `{runs / name}` or `{runs / name / 'eval'}`; "
                    "row left out (run `amoc evaluate` on its classifier.pt)."
                )
            continue
        curve = _read_csv(folder / "curve.csv", notes)
        if curve is not None and not {"eps_255", "accuracy"} <= set(curve.columns):
            notes.append(f"`{folder / 'curve.csv'}` lacks eps_255/accuracy columns; curve skipped.")
            curve = None
        label, short = _model_label(name, train), _model_label(name, train, True)
        best = ev.get("best") if isinstance(ev.get("best"), dict) else None
        if best and best.get("same_as_last"):
            label += f" (last epoch {ev.get('epoch')} = best on validation)"
        elif best:
            label += f" (last epoch {ev.get('epoch')})"
        found.append(
            {
                "name": name,
                "label": label,
                "short": short,
                "eval": ev,
                "curve": curve,
                **{key: _num(ev.get(key)) for key, _ in METRICS},
            }
        )
        if best and not best.get("same_as_last"):  # the best-on-validation classifier, side by side
            found.append(
                {
                    "name": f"{name}/best",
                    "label": f"{_model_label(name, train)} (best on validation, epoch "
                    f"{best.get('epoch')}, {best.get('selected_by')})",
                    "short": f"{short} best",
                    "eval": ev,
                    "curve": None,
                    **{key: _num(best.get(key)) for key, _ in METRICS},
                }
            )
    return found


# --------------------------------------------------------------------------- markdown
def _settings_text(ev: dict[str, Any]) -> str:
    s = ev.get("settings") or {}
    pgd, aa = s.get("pgd") or {}, s.get("autoattack") or {}
    parts = []
    if pgd:
        parts.append(
            f"PGD-{pgd.get('steps')}: L-inf eps {pgd.get('eps_255')}/255, step {pgd.get('step_255')}/255, "
            f"{'random start' if pgd.get('random_start') else 'no random start'}, N = {pgd.get('n_images')}"
        )
    if aa.get("enabled"):
        parts.append(
            f"AutoAttack {aa.get('version')} ({', '.join(aa.get('attacks') or [])}; {aa.get('iterations')} "
            f"iterations, {aa.get('library')}): L-inf eps {aa.get('eps_255')}/255, N = {aa.get('n_images')}"
        )
    elif aa:
        parts.append("AutoAttack off")
    sub = ev.get("subset") or {}
    if aa.get("enabled") and sub.get("n_images") and sub.get("n_images") != pgd.get("n_images"):
        parts.append(
            f"on the same {sub['n_images']} AutoAttack images: clean {fmt(_num(sub.get('clean_acc')))}, "
            f"PGD {fmt(_num(sub.get('pgd_acc')))}, AutoAttack {fmt(_num(sub.get('autoattack_acc')))}"
        )
    return "; ".join(parts) or "settings not recorded"


def model_table(models: list[dict[str, Any]]) -> str:
    pgd = pgd_name(models)
    lines = [
        f"| model | clean (%) | {pgd} (%) | AutoAttack (%) | N clean / {pgd} | N AutoAttack |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        s = m["eval"].get("settings") or {}
        n = (s.get("pgd") or {}).get("n_images", m["eval"].get("n_images", "?"))
        aa = s.get("autoattack") or {}
        n_aa = aa.get("n_images", "?") if aa.get("enabled", True) else "-"
        lines.append(
            f"| {m['label']} | {fmt(m['clean_acc'])} | {fmt(m['pgd_acc'])} | {fmt(m['autoattack_acc'])} "
            f"| {n} | {n_aa} |"
        )
    return "\n".join(lines)


def _pretrain_label(r: dict[str, Any]) -> str:
    """AMOC runs by variant and queue size, the other methods by name."""
    return f"{r['variant']}, K={r['queue_size']}" if r["method"] == "AMOC" else r["method"]


def pretrain_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| run | method | variant | queue size | epochs | k-NN acc (%) | k-NN of the random-init encoder (%) "
        "| the same with training BN statistics (%) | final loss | chance-level loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['run']} | {r['method']} | {r['variant']} | {fmt(r['queue_size'])} | {fmt(r['epochs'])} "
            f"| {fmt(r['knn_acc'])} | {fmt(r['knn_random_acc'])} | {fmt(r['knn_random_bn_acc'])} | {fmt(r['loss'], 4)} "
            f"| {fmt(r['chance'], 4)} ({r['chance_label']}) |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def figures(out: Path, pretrain: list[dict[str, Any]], models: list[dict[str, Any]], notes: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    sns.set_theme(style="whitegrid")
    written: list[Path] = []
    pgd = pgd_name(models) if models else "PGD"

    def legend_outside(ax: Any, title: str | None = None) -> None:
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), title=title, frameon=False)

    def figure(name: str, draw: Callable[[Any], None], size: tuple[float, float] = (6.4, 4.2)) -> None:
        fig, ax = plt.subplots(figsize=size)
        try:
            draw(ax)
            written.append(save_png(fig, out / name))
        finally:
            plt.close(fig)

    logs = [(r["run"], r["log"]) for r in pretrain if r["log"] is not None and "epoch" in r["log"]]
    long = [
        log.melt(
            id_vars="epoch",
            value_vars=[c for c in ("loss", "loss_clean", "loss_adv") if c in log],
            var_name="term",
            value_name="value",
        ).assign(run=run)
        for run, log in logs
    ]
    long = [d.dropna(subset=["value"]) for d in long]
    if long and any(len(d) for d in long):
        data = pd.concat(long, ignore_index=True)

        def draw_loss(ax: Any) -> None:
            sns.lineplot(
                data=data, x="epoch", y="value", hue="term", style="run" if len(logs) > 1 else None, marker="o", ax=ax
            )
            ax.set(title="Pre-training loss", xlabel="epoch", ylabel="InfoNCE loss (nats)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            legend_outside(ax)

        figure("pretrain_loss.png", draw_loss)
    else:
        notes.append("No pre-training log.csv with losses: loss figure skipped.")

    knn = [log[["epoch", "knn_acc"]].dropna().assign(run=run) for run, log in logs if "knn_acc" in log]
    knn = [d.assign(knn_acc=d["knn_acc"].map(_pct_knn)) for d in knn if len(d)]
    if knn:
        kdata = pd.concat(knn, ignore_index=True)

        # the random-init encoder as initialised (dashed) and with training BN statistics (dotted)
        baselines = [
            (r["run"], key, style, what)
            for r in pretrain
            for key, style, what in (
                ("knn_random_acc", "--", "random-init encoder, initial BN statistics"),
                ("knn_random_bn_acc", ":", "random-init encoder, training BN statistics"),
            )
            if r[key] is not None
        ]
        colours = {run: f"C{i}" for i, run in enumerate(dict.fromkeys(run for run, *_ in baselines))}
        values = {r["run"]: r for r in pretrain}

        def draw_knn(ax: Any) -> None:
            sns.lineplot(data=kdata, x="epoch", y="knn_acc", hue="run", marker="o", ax=ax)
            for run, key, style, what in baselines:
                ax.axhline(
                    values[run][key],
                    color=colours[run],
                    linestyle=style,
                    linewidth=1,
                    label=f"{what} ({run})" if len(colours) > 1 else what,
                )
            ax.set(
                title="k-NN accuracy during pre-training",
                xlabel="epoch",
                ylabel="k-NN accuracy (%)",
                xlim=(0, max(1, int(kdata["epoch"].max())) + 0.5),
            )
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
            legend_outside(ax, "run")

        figure("pretrain_knn.png", draw_knn)
    else:
        notes.append("No k-NN accuracy in any pre-training log: k-NN figure skipped.")

    curves = [m["curve"][["eps_255", "accuracy"]].assign(model=m["short"]) for m in models if m["curve"] is not None]
    if curves:
        cdata = pd.concat(curves, ignore_index=True)

        def draw_curve(ax: Any) -> None:
            sns.lineplot(data=cdata, x="eps_255", y="accuracy", hue="model", marker="o", ax=ax)
            steps = ((models[0]["eval"].get("settings") or {}).get("curve") or {}).get("steps")
            ax.set(
                title=f"Robust accuracy vs attack budget (PGD-{steps})"
                if steps
                else "Robust accuracy vs attack budget",
                xlabel="L-inf eps (x 255)",
                ylabel="robust accuracy (%)",
                ylim=(0, 100),
            )
            legend_outside(ax, "model")

        figure("robust_curve.png", draw_curve)
    else:
        notes.append("No curve.csv from `amoc evaluate`: robustness-curve figure skipped.")

    def counts(key: str) -> set[Any]:
        def n(m: dict[str, Any]) -> Any:
            s = m["eval"].get("settings") or {}
            return (
                (s.get("autoattack") or {}).get("n_images")
                if key == "autoattack_acc"
                else (s.get("pgd") or {}).get("n_images")
            )

        return {n(m) for m in models if m[key] is not None}

    def bar_name(key: str, label: str) -> str:  # "AutoAttack (N=500)" when every model used the same N
        name = pgd if key == "pgd_acc" else label
        ns = counts(key)
        return f"{name} (N={ns.pop()})" if len(ns) == 1 and None not in ns else name

    bars = [
        {"model": m["short"], "attack": bar_name(key, label), "accuracy": m[key]}
        for m in models
        for key, label in METRICS
        if m[key] is not None
    ]
    if bars:
        bdata = pd.DataFrame(bars)

        def draw_bars(ax: Any) -> None:
            sns.barplot(data=bdata, x="model", y="accuracy", hue="attack", ax=ax)
            for container in ax.containers:
                ax.bar_label(container, fmt="%.1f", fontsize=8, padding=2)
            ax.set(
                title="Clean and robust accuracy (L-inf)",
                xlabel="downstream model",
                ylabel="accuracy (%)",
                ylim=(0, 105),
            )
            ax.set_xticks(ax.get_xticks(), [textwrap.fill(t.get_text(), 12) for t in ax.get_xticklabels()])
            legend_outside(ax, "evaluation")

        n_models = bdata["model"].nunique()
        figure("accuracy_bars.png", draw_bars, size=(max(7.2, 1.5 * n_models + 2.5), 4.2))
    else:
        notes.append("No eval.json: accuracy bar chart skipped.")

    distinct = {(r["method"], r["variant"], r["queue_size"]) for r in pretrain if r["knn_acc"] is not None}
    if len(distinct) > 1:
        pdata = pd.DataFrame(
            [
                {"run": f"{_pretrain_label(r)} ({r['run']})", "knn_acc": r["knn_acc"]}
                for r in pretrain
                if r["knn_acc"] is not None
            ]
        )

        def draw_cmp(ax: Any) -> None:
            sns.barplot(data=pdata, y="run", x="knn_acc", hue="run", legend=False, ax=ax)
            for container in ax.containers:
                ax.bar_label(container, fmt="%.1f", fontsize=8, padding=2)
            ax.set(title="Pre-training runs compared", xlabel="k-NN accuracy (%)", ylabel="variant, queue size")

        figure("pretrain_compare.png", draw_cmp, size=(7.2, 0.6 * len(pdata) + 1.6))
    return written


# --------------------------------------------------------------------------- stage
def build_report(runs: Path, out: Path) -> tuple[str, str, list[Path]]:
    """(report markdown, downstream table, PNG paths); writes nothing but the figures."""
    notes: list[str] = []
    if not runs.is_dir():
        notes.append(f"`{runs}` does not exist: nothing to report yet.")
        pretrain, models = [], []
    else:
        pretrain, models = collect_pretrain(runs, notes), collect_models(runs, notes)
    pngs = figures(out, pretrain, models, notes)
    beyond = ""
    if runs.is_dir():  # corruption robustness and transfer attacks (issue 10), when run
        pngs += robustness_plots.corruption_heatmaps(runs, out)
        transfer_png = robustness_plots.transfer_heatmap(runs, out)
        pngs += [transfer_png] if transfer_png else []
        beyond = robustness_plots.markdown_sections(runs)
    table = model_table(models) if models else "_No evaluated downstream model yet._"
    md = ["# AMOC report", "", f"Inputs: `{runs}`.", "", "## Downstream models (test set, L-inf)", "", table, ""]
    if models:
        md += [
            "Robust accuracy counts an image only if it is classified correctly both clean and under attack. "
            "N = number of test images behind each number.",
            "",
        ]
        md += [f"- {m['label']}: {_settings_text(m['eval'])}" for m in models if not m["name"].endswith("/best")] + [""]
    md += ["## Pre-training", "", pretrain_table(pretrain) if pretrain else "_No pre-training run found._", ""]
    if beyond.strip():
        md += [beyond.strip(), ""]
    if pngs:
        md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(md), table, pngs


def run(cfg: Config, args: argparse.Namespace) -> int:
    out = Path(args.out)
    with RunLock(out):
        md, table, pngs = build_report(Path(args.runs), out)
        write_text(out / "report.md", md)
    print(table)
    for p in pngs:
        print(p)
    print(out / "report.md")
    return 0
