"""`amoc compare`: DVC experiments grouped into configurations, mean +- sd over seeds.

Reads `dvc exp show --json` in a DVC workspace (params and the `metrics:` files of every
experiment, as git keeps them), groups the chosen experiments by their params with the
seed left out, and prints a markdown table with a column per configuration and a row per
headline metric: mean +- standard deviation (n - 1 in the denominator), with n. `--figure` draws the same
numbers: a bar per configuration at the mean, its +-sd interval, and each seed as a point.

    amoc compare                       # every experiment of the workspace
    amoc compare exp-a exp-b           # any two (or more) experiments, commits or branches
    amoc compare --metrics 'alf.*' --figure compare.png --out compare.md
    amoc compare --baseline amoc       # and each configuration's difference from one, +- SE
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amoc.config import Config
from amoc.errors import AmocError

# Leaves of the metrics files that count images, not accuracy: printed once under the table.
COUNTS = ("n", "n_autoattack")
# Stored as fractions (k-NN); shown in percent like every other accuracy.
FRACTIONS = ("pretrain.knn_acc", "pretrain.knn_random_acc")
# Column order: pre-training, then the models in pipeline order.
SECTIONS = ("pretrain", "slf", "alf", "aff", "scratch", "transfer")
LEAVES = (
    "knn_acc",
    "knn_random_acc",
    "knn_random_bn_acc",
    "loss",
    "chance_loss",
    "minutes",
    "clean",
    "pgd",
    "autoattack",
)
# A name ending in a seed ("amoc-b128-s2", "acl_seed3") names its configuration without it.
SEED_SUFFIX = re.compile(r"[-_.](s|seed)\d+$")


@dataclass
class Experiment:
    name: str
    rev: str
    params: dict[str, Any]
    metrics: dict[str, float]
    counts: dict[str, Any] = field(default_factory=dict)
    state: str = "done"  # or DVC's queue states: queued, running, failed


UNFINISHED = ("queued", "running", "failed")


@dataclass
class Group:
    label: str
    members: list[Experiment]
    setting: dict[str, Any]  # the params that set this group apart (seed excluded)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def metric_prefix(path: str) -> str:
    """runs/slf/eval/metrics.json -> slf; runs/slf/corruptions/metrics.json -> slf.corruptions."""
    parts = Path(path).with_suffix("").parts
    parts = [p for p in parts if p not in ("runs", "metrics", "eval")]
    return ".".join(parts) or Path(path).stem


def _experiment(name: str, rev: str, data: dict[str, Any], state: str = "done") -> Experiment:
    params: dict[str, Any] = {}
    for file_params in (data.get("params") or {}).values():
        params.update(_flatten(file_params.get("data") or {}))
    metrics: dict[str, float] = {}
    counts: dict[str, Any] = {}
    for path, content in (data.get("metrics") or {}).items():
        prefix = metric_prefix(path)
        for key, value in _flatten(content.get("data") or {}).items():
            full = f"{prefix}.{key}"
            if key in COUNTS:
                counts[full] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[full] = 100.0 * value if full in FRACTIONS else float(value)
    return Experiment(name, rev, params, metrics, counts, state)


def parse_exp_show(doc: list[dict[str, Any]]) -> list[Experiment]:
    """Every baseline commit and experiment of `dvc exp show --json`, oldest experiment first."""
    found: list[Experiment] = []
    for commit in doc:
        rev = commit.get("rev") or ""
        if commit.get("data"):
            found.append(
                _experiment(commit.get("name") or (rev if rev == "workspace" else rev[:7]), rev, commit["data"])
            )
        # dvc lists a commit's experiments newest first; a study reads better in queue order
        for exp in reversed(commit.get("experiments") or []):
            # a queued one has no data, a running one partial metrics: kept, to name them
            state = (exp.get("executor") or {}).get("state") or "done"
            for run in exp.get("revs") or []:
                name = exp.get("name") or run.get("name") or run["rev"][:7]
                found.append(_experiment(name, run["rev"], run.get("data") or {}, state))
    return found


def read_workspace(workspace: Path) -> list[Experiment]:
    if shutil.which("dvc") is None:
        raise AmocError("dvc not found on PATH; run `amoc compare` from the environment where dvc is installed")
    if not (workspace / ".dvc").is_dir():
        raise AmocError(
            f"{workspace}: not a DVC project (no .dvc folder); pass --workspace with the folder of your experiments"
        )
    proc = subprocess.run(["dvc", "exp", "show", "--json"], cwd=workspace, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise AmocError(f"`dvc exp show --json` failed in {workspace}: {last}")
    return parse_exp_show(json.loads(proc.stdout))


# Read from each experiment's pre-training summary (git keeps it): the loss's chance level
# differs between methods, the wall time says what an epoch of each method costs, and the
# random-init k-NN under training BN statistics is kept out of metrics.json (issue 19).
SUMMARY = "runs/pretrain/summary.json"


def git_show(workspace: Path, rev: str, path: str) -> str | None:
    """The text of `path` as commit `rev` of the workspace holds it, or None where it has none."""
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=workspace, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def add_pretrain_summary(workspace: Path, experiments: list[Experiment]) -> None:
    """pretrain.chance_loss, pretrain.knn_random_bn_acc (in %) and pretrain.minutes, where the
    experiment's commit has the summary."""
    for e in experiments:
        text = git_show(workspace, e.rev, SUMMARY)
        try:  # absent: not amoc's DAG, or no pre-training in this experiment
            info = json.loads(text) if text is not None else {}
        except json.JSONDecodeError:
            continue
        if not isinstance(info, dict):
            continue
        if isinstance(info.get("chance_loss"), (int, float)):
            e.metrics["pretrain.chance_loss"] = float(info["chance_loss"])
        if isinstance(info.get("knn_random_bn_acc"), (int, float)):
            e.metrics["pretrain.knn_random_bn_acc"] = 100.0 * float(info["knn_random_bn_acc"])
        if isinstance(info.get("seconds"), (int, float)):
            e.metrics["pretrain.minutes"] = float(info["seconds"]) / 60


def select(experiments: list[Experiment], names: list[str]) -> list[Experiment]:
    """The named experiments (by name, full or short rev), or every finished one with metrics."""
    if not names:  # the workspace repeats its commit's results (or holds uncommitted ones)
        return [e for e in experiments if e.metrics and e.rev != "workspace" and e.state not in UNFINISHED]
    chosen = []
    for name in names:
        match = [e for e in experiments if name in (e.name, e.rev) or (len(name) >= 7 and e.rev.startswith(name))]
        if not match:
            known = ", ".join(e.name for e in experiments) or "none"
            raise AmocError(f"no experiment {name!r} in this workspace; known: {known} (see `dvc exp show`)")
        if match[0].state in UNFINISHED or not match[0].metrics:
            raise AmocError(f"experiment {name!r} is {match[0].state}, not finished: see `dvc queue status`")
        chosen.append(match[0])
    return chosen


def group(experiments: list[Experiment], seed_key: str = "seed") -> list[Group]:
    """Experiments with equal params (the seed aside) form one configuration, in first-seen order."""
    keys = sorted({k for e in experiments for k in e.params} - {seed_key})
    varying = [k for k in keys if len({json.dumps(e.params.get(k), sort_keys=True) for e in experiments}) > 1]
    groups: dict[str, Group] = {}
    for e in experiments:
        setting = {k: e.params.get(k) for k in varying}
        key = json.dumps(setting, sort_keys=True)
        if key not in groups:
            groups[key] = Group("", [], setting)
        groups[key].members.append(e)
    for g in groups.values():
        stems = {SEED_SUFFIX.sub("", e.name) for e in g.members}
        described = ", ".join(f"{k}={v}" for k, v in g.setting.items()) or "same params"
        g.label = stems.pop() if len(stems) == 1 else described
    labels = [g.label for g in groups.values()]
    for g in groups.values():  # two configurations must never share a label
        if labels.count(g.label) > 1:
            g.label = ", ".join(f"{k}={v}" for k, v in g.setting.items()) or g.label
    return list(groups.values())


def metric_names(experiments: list[Experiment], patterns: list[str]) -> list[str]:
    known = {m for e in experiments for m in e.metrics}
    names = {m for m in known if not patterns or any(fnmatch.fnmatchcase(m, p) for p in patterns)}
    if not names:
        raise AmocError(f"--metrics {' '.join(patterns)}: matches no metric; known: {', '.join(sorted(known))}")

    def order(name: str) -> tuple[int, int, str]:
        head, leaf = name.split(".")[0], name.split(".", 1)[-1]
        rank = LEAVES.index(leaf) if leaf in LEAVES else len(LEAVES)
        return (SECTIONS.index(head) if head in SECTIONS else len(SECTIONS), rank, name)

    return sorted(names, key=order)


def summary(values: list[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (None for one value) and n."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else None
    return mean, sd, len(values)


def cell(values: list[float], n_group: int) -> str:
    if not values:
        return "n/a"
    mean, sd, n = summary(values)
    text = f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"
    return text if n == n_group else f"{text} (n={n})"


def difference(a: list[float], b: list[float]) -> tuple[float, float | None, float | None]:
    """Mean of a minus mean of b, the difference's standard error (sqrt(sd_a^2/n_a +
    sd_b^2/n_b)) and Welch's two-sided t-test p-value; both None unless each side has two
    values or more (and the p-value None where both sides are constant)."""
    mean_a, sd_a, n_a = summary(a)
    mean_b, sd_b, n_b = summary(b)
    if sd_a is None or sd_b is None:
        return mean_a - mean_b, None, None
    se = math.sqrt(sd_a**2 / n_a + sd_b**2 / n_b)
    if se <= 1e-9 * max(1.0, abs(mean_a), abs(mean_b)):  # constant up to rounding: no test
        return mean_a - mean_b, se, None
    from scipy import stats  # scikit-learn's dependency, already installed

    with warnings.catch_warnings():  # near-equal values within a side: scipy warns, the p stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return mean_a - mean_b, se, float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def difference_table(groups: list[Group], metrics: list[str], baseline: str) -> str:
    """Each configuration's difference from `baseline`'s mean, its standard error, Welch's p."""
    base = next((g for g in groups if g.label == baseline), None)
    if base is None:
        raise AmocError(
            f"--baseline {baseline!r}: no such configuration; choose one of {', '.join(g.label for g in groups)}"
        )
    others = [g for g in groups if g is not base]
    lines = [
        f"Difference from {baseline}: mean difference ± its standard error, and Welch's two-sided t-test "
        "p-value (with 2-3 seeds a side the test has 1-4 degrees of freedom: only large differences "
        "reach p < 0.05).",
        "",
        "| metric | " + " | ".join(f"{g.label} - {baseline}" for g in others) + " |",
        "|---|" + "---:|" * len(others),
    ]
    for m in metrics:
        b = [e.metrics[m] for e in base.members if m in e.metrics]
        cells = []
        for g in others:
            a = [e.metrics[m] for e in g.members if m in e.metrics]
            if not a or not b:
                cells.append("n/a")
                continue
            diff, se, p = difference(a, b)
            text = f"{diff:+.2f}" if se is None else f"{diff:+.2f} ± {se:.2f}"
            cells.append(text if p is None else f"{text} (p {p:.2g})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(groups: list[Group], metrics: list[str], experiments: list[Experiment]) -> str:
    """One row per metric, one column per configuration: pastes into a page of any width."""
    lines = [
        "| metric | " + " | ".join(f"{g.label} (n={len(g.members)})" for g in groups) + " |",
        "|---|" + "---:|" * len(groups),
    ]
    for m in metrics:
        cells = [cell([e.metrics[m] for e in g.members if m in e.metrics], len(g.members)) for g in groups]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Mean ± sample standard deviation over the n experiments of each configuration; units as in the "
        "metrics files (accuracies in %), k-NN converted to %; pretrain.chance_loss, pretrain.knn_random_bn_acc "
        "and pretrain.minutes (wall clock) from runs/pretrain/summary.json."
    )
    sections = {m.split(".")[0] for m in metrics}
    images = []
    for k in sorted({k for e in experiments for k in e.counts if k.split(".")[0] in sections}):
        seen = sorted({str(e.counts[k]) for e in experiments if k in e.counts})
        images.append(f"{k} = {'/'.join(seen)}")
    if images:
        lines.append("Test images behind each accuracy: " + ", ".join(images) + ".")
    lines.append("")
    lines.append("| configuration | experiments | params that differ |")
    lines.append("|---|---|---|")
    for g in groups:
        members = ", ".join(f"{e.name} ({e.rev[:7]})" for e in g.members)
        setting = ", ".join(f"`{k}={v}`" for k, v in g.setting.items()) or "none"
        lines.append(f"| {g.label} | {members} | {setting} |")
    return "\n".join(lines) + "\n"


def figure(groups: list[Group], metrics: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    from amoc.report.render import save_png

    rows = [
        {"configuration": g.label, "metric": m, "value": e.metrics[m]}
        for g in groups
        for e in g.members
        for m in metrics
        if m in e.metrics
    ]
    frame = pd.DataFrame(rows)
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.2 * cols, 0.5 + (2.2 + 0.25 * len(groups)) * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    order = [g.label for g in groups]
    for ax, metric in zip(axes, metrics):
        data = frame[frame.metric == metric]
        sns.barplot(
            data=data, y="configuration", x="value", order=order, errorbar="sd", ax=ax, color="#9ecae1", capsize=0.2
        )
        sns.stripplot(data=data, y="configuration", x="value", order=order, ax=ax, color="black", size=4)
        ax.set_title(metric)
        leaf = metric.rsplit(".", 1)[-1]
        ax.set_xlabel(leaf if leaf in ("loss", "chance_loss", "minutes", "relative_drop") else "%")
        ax.set_ylabel("")
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle("mean (bar), ± sd (line) and each seed (point) per configuration")
    fig.tight_layout()
    return save_png(fig, path)


def run(cfg: Config, args: argparse.Namespace) -> int:
    del cfg  # compare reads experiments, not params
    from amoc import io

    everything = read_workspace(Path(args.workspace))
    experiments = select(everything, args.experiments)
    add_pretrain_summary(Path(args.workspace), experiments)
    pending = [e.name for e in everything if e.state in UNFINISHED and e not in experiments]
    if pending:
        print(f"amoc compare: left out {len(pending)} unfinished: {', '.join(pending)}", file=sys.stderr)
    if not experiments:
        raise AmocError(f"no experiment with metrics in {args.workspace}; run some first (`dvc exp run`) or name them")
    groups = group(experiments, args.seed_key)
    metrics = metric_names(experiments, args.metrics)
    text = markdown(groups, metrics, experiments)
    if args.baseline:
        text += "\n" + difference_table(groups, metrics, args.baseline)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        io.write_text(args.out, text)
        print(
            f"amoc compare: {len(experiments)} experiments, {len(groups)} configurations -> {args.out}", file=sys.stderr
        )
    if args.figure:
        figure(groups, metrics, Path(args.figure))
        print(f"amoc compare: figure -> {args.figure}", file=sys.stderr)
    return 0
