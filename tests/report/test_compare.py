"""`amoc compare`: experiments grouped by params without the seed, mean +- sd, on real DVC."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from amoc import cli
from amoc.errors import AmocError
from amoc.report import compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def exp_data(method: str, seed: int, knn: float, slf_pgd: float) -> dict:
    """One experiment's `data` as `dvc exp show --json` writes it."""
    return {
        "params": {"params.yaml": {"data": {"seed": seed, "pretrain": {"method": method, "epochs": 20}}}},
        "metrics": {
            "runs/pretrain/metrics.json": {"data": {"knn_acc": knn, "loss": 5.0}},
            "runs/slf/eval/metrics.json": {
                "data": {"clean": 40.0 + seed, "pgd": slf_pgd, "n": 1017, "n_autoattack": 200}
            },
        },
    }


def exp_show(runs: list[tuple[str, dict | None]], states: dict[str, str] | None = None) -> list[dict]:
    """A baseline commit without results, then its experiments (dvc lists the newest first);
    `states`: the queue's state of some (others ran with a plain `dvc exp run`)."""
    states = states or {}
    experiments = [
        {"name": name, "revs": [{"rev": f"{i:040x}", "name": name, "data": data}]}
        | ({"executor": {"state": states[name], "name": "dvc-task"}} if name in states else {})
        for i, (name, data) in enumerate(runs, 1)
    ]
    return [
        {"rev": "workspace", "name": None, "data": {"params": {}, "metrics": {}}},
        {"rev": "f" * 40, "name": "main", "data": {"params": {}, "metrics": {}}, "experiments": experiments[::-1]},
    ]


STUDY = [
    ("amoc-s1", exp_data("amoc", 1, 0.30, 12.0)),
    ("acl-s1", exp_data("acl", 1, 0.28, 9.0)),
    ("amoc-s2", exp_data("amoc", 2, 0.34, 14.5)),
    ("acl-s2", exp_data("acl", 2, 0.27, 10.0)),
    ("amoc-s3", exp_data("amoc", 3, 0.31, 11.0)),
    ("queued", None),  # queued: no data yet
    ("running", exp_data("amoc", 4, 0.99, 99.0)),  # running: partial metrics
]
STATES = {"amoc-s1": "success", "queued": "queued", "running": "running"}


def test_parse_flattens_params_and_metrics_and_keeps_queue_order():
    exps = compare.parse_exp_show(exp_show(STUDY, STATES))
    with_metrics = [e for e in exps if e.metrics]
    assert [e.name for e in with_metrics] == ["amoc-s1", "acl-s1", "amoc-s2", "acl-s2", "amoc-s3", "running"]
    # by default only finished experiments count: a running one's metrics are partial
    assert [e.name for e in compare.select(exps, [])] == ["amoc-s1", "acl-s1", "amoc-s2", "acl-s2", "amoc-s3"]
    first = with_metrics[0]
    assert first.params["pretrain.method"] == "amoc" and first.params["seed"] == 1
    assert first.metrics["pretrain.knn_acc"] == pytest.approx(30.0)  # a fraction in the file, % here
    assert first.metrics["slf.pgd"] == 12.0 and "slf.n" not in first.metrics
    assert first.counts == {"slf.n": 1017, "slf.n_autoattack": 200}


def test_groups_by_params_without_the_seed_and_reports_mean_and_sample_sd():
    exps = compare.select(compare.parse_exp_show(exp_show(STUDY, STATES)), [])
    groups = compare.group(exps)
    assert [(g.label, len(g.members)) for g in groups] == [("amoc", 3), ("acl", 2)]
    assert groups[0].setting == {"pretrain.method": "amoc"}
    text = compare.markdown(groups, compare.metric_names(exps, []), exps)
    amoc_pgd = np.array([12.0, 14.5, 11.0])
    row = next(line for line in text.splitlines() if line.startswith("| slf.pgd |"))
    assert f"{amoc_pgd.mean():.2f} ± {amoc_pgd.std(ddof=1):.2f}" in row
    assert f"{np.mean([9.0, 10.0]):.2f} ± {np.std([9.0, 10.0], ddof=1):.2f}" in row
    assert "| metric | amoc (n=3) | acl (n=2) |" in text
    assert "slf.n = 1017" in text and "slf.n_autoattack = 200" in text
    # headline order: pre-training first, clean before PGD
    names = compare.metric_names(exps, [])
    assert names.index("pretrain.knn_acc") < names.index("slf.clean") < names.index("slf.pgd")


def test_one_experiment_per_configuration_has_no_sd_and_a_missing_metric_says_its_n():
    runs = [
        ("a", exp_data("amoc", 1, 0.3, 12.0)),
        ("b", exp_data("acl", 1, 0.3, 9.0)),
        ("c", exp_data("acl", 2, 0.3, 8.0)),
    ]
    del runs[2][1]["metrics"]["runs/slf/eval/metrics.json"]
    exps = compare.select(compare.parse_exp_show(exp_show(runs)), [])
    text = compare.markdown(compare.group(exps), ["slf.pgd"], exps)
    assert "| slf.pgd | 12.00 | 9.00 (n=1) |" in text
    assert compare.summary([1.0]) == (1.0, None, 1)
    assert compare.summary([1.0, 2.0, 4.0])[1] == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))


def test_configurations_without_a_shared_name_are_labelled_by_their_params():
    runs = [
        ("x", exp_data("amoc", 1, 0.3, 12.0)),
        ("y", exp_data("acl", 1, 0.3, 9.0)),
        ("z", exp_data("acl", 2, 0.3, 8.0)),
    ]
    groups = compare.group(compare.select(compare.parse_exp_show(exp_show(runs)), []))
    assert [g.label for g in groups] == ["x", "pretrain.method=acl"]


def test_selection_errors_name_the_problem():
    exps = compare.parse_exp_show(exp_show(STUDY, STATES))
    with pytest.raises(AmocError, match="no experiment 'nope'.*known: .*amoc-s1"):
        compare.select(exps, ["nope"])
    with pytest.raises(AmocError, match="'queued' is queued, not finished"):
        compare.select(exps, ["queued"])
    with pytest.raises(AmocError, match="'running' is running, not finished"):
        compare.select(exps, ["running"])
    with pytest.raises(AmocError, match="matches no metric"):
        compare.metric_names(compare.select(exps, []), ["alf.*"])


DVC_YAML = """\
stages:
  train:
    cmd: python make_metrics.py
    deps: [make_metrics.py]
    params: [seed, method]
    outs:
      - runs/pretrain/summary.json:
          cache: false
    metrics:
      - runs/pretrain/metrics.json:
          cache: false
"""

# A stand-in for the DAG: metrics that depend on the method and the seed, like a real run's.
MAKE_METRICS = """\
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
base = {"amoc": 0.40, "acl": 0.30}[p["method"]]
os.makedirs("runs/pretrain", exist_ok=True)
json.dump({"knn_acc": base + 0.01 * p["seed"], "loss": 5.0}, open("runs/pretrain/metrics.json", "w"))
summary = {"seconds": 60 * p["seed"], "chance_loss": 6.5, "knn_random_bn_acc": 0.2 + 0.01 * p["seed"]}
json.dump(summary, open("runs/pretrain/summary.json", "w"))
"""


@pytest.fixture(scope="module")
def dvc_workspace(tmp_path_factory) -> Path:
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    if not Path(dvc).exists():
        pytest.fail("dvc is not installed beside this interpreter (it is a dependency of amoc)")
    ws = tmp_path_factory.mktemp("compare-ws")
    (ws / "dvc.yaml").write_text(DVC_YAML)
    (ws / "params.yaml").write_text("seed: 1\nmethod: amoc\n")
    (ws / "make_metrics.py").write_text(MAKE_METRICS)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env["PATH"] = f"{Path(dvc).parent}{os.pathsep}{env.get('PATH', '')}"

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, cwd=ws, env=env, check=True, capture_output=True, text=True)

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "-m", "workspace")
    for method in ("amoc", "acl"):
        for seed in (1, 2):
            sh("dvc", "exp", "run", "-q", "-n", f"{method}-s{seed}", "-S", f"seed={seed}", "-S", f"method={method}")
    return ws


@pytest.mark.slow
def test_compare_reads_real_dvc_experiments(dvc_workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.chdir(tmp_path)  # no params.yaml here: compare needs none
    out, png = tmp_path / "compare.md", tmp_path / "compare.png"
    rc = cli.main(["compare", "--workspace", str(dvc_workspace), "--out", str(out), "--figure", str(png)])
    assert rc == 0
    text = out.read_text()
    assert "| metric | amoc (n=2) | acl (n=2) |" in text
    knn = next(line for line in text.splitlines() if line.startswith("| pretrain.knn_acc |"))
    for values in ([41.0, 42.0], [31.0, 32.0]):
        assert f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" in knn
    assert png.read_bytes()[:8] == PNG_MAGIC
    # from each experiment's committed summary.json: the chance level, the like-for-like
    # random-init k-NN (a fraction there, in % here) and the wall time
    assert "| pretrain.chance_loss | 6.50 ± 0.00 | 6.50 ± 0.00 |" in text
    assert f"| pretrain.knn_random_bn_acc | 21.50 ± {np.std([21, 22], ddof=1):.2f} |" in text
    assert f"| pretrain.minutes | 1.50 ± {np.std([1, 2], ddof=1):.2f} |" in text

    # any two experiments, by name: each its own configuration
    rc = cli.main(["compare", "--workspace", str(dvc_workspace), "amoc-s1", "acl-s2", "--metrics", "pretrain.knn_acc"])
    assert rc == 0
    shown = capsys.readouterr().out
    assert "| pretrain.knn_acc | 41.00 | 32.00 |" in shown


def test_compare_outside_a_dvc_project_is_one_line(tmp_path, capsys):
    rc = cli.main(["compare", "--workspace", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "not a DVC project" in err


def test_differences_from_a_baseline_carry_welchs_standard_error():
    exps = compare.select(compare.parse_exp_show(exp_show(STUDY, STATES)), [])
    text = compare.difference_table(compare.group(exps), ["slf.pgd"], "amoc")
    amoc_pgd, acl_pgd = np.array([12.0, 14.5, 11.0]), np.array([9.0, 10.0])
    se = np.sqrt(amoc_pgd.var(ddof=1) / 3 + acl_pgd.var(ddof=1) / 2)
    # Welch's t by hand: t = diff / se, df from the Welch-Satterthwaite equation
    va, vb = acl_pgd.var(ddof=1) / 2, amoc_pgd.var(ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 1 + vb**2 / 2)
    p = 2 * scipy_stats.t.sf(abs(acl_pgd.mean() - amoc_pgd.mean()) / se, df)
    assert f"| slf.pgd | {acl_pgd.mean() - amoc_pgd.mean():+.2f} ± {se:.2f} (p {p:.2g}) |" in text
    with pytest.raises(AmocError, match="--baseline 'nope': no such configuration; choose one of amoc, acl"):
        compare.difference_table(compare.group(exps), ["slf.pgd"], "nope")
