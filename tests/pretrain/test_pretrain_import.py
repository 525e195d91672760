"""`amoc pretrain` with pretrain.from_encoder: a released encoder as the pipeline's
pre-trained encoder (docs/import.md). In-process: the stage's outputs, the checks of
the pinned sha256, and the downstream stages and the report on the imported encoder.
With DVC (slow): `dvc exp run -S pretrain.from_encoder...` runs probe and evaluation
on it, and a second run with the same params re-runs nothing."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from downstream_helpers import make_prepared, params_file, run_stage
from import_helpers import resnet18_state

from amoc import cli
from amoc.nets.store import load_encoder_file
from amoc.pretrain.log import COLUMNS

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WIDTH = 0.0625


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, str]:
    """An authors-layout paras.pt (random weights, tiny width) and its sha256."""
    path = tmp_path_factory.mktemp("released") / "paras.pt"
    torch.save(resnet18_state("authors", WIDTH, seed=2), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _import_sets(path: Path, digest: str) -> dict[str, str]:
    return {
        "pretrain.from_encoder.path": str(path),
        "pretrain.from_encoder.layout": "authors",
        "pretrain.from_encoder.sha256": digest,
    }


def test_pretrain_imports_instead_of_training_and_downstream_runs(tmp_path, source, capsys):
    path, digest = source
    data = make_prepared(tmp_path / "data")
    params = params_file(tmp_path)
    out = tmp_path / "runs" / "pretrain"
    assert run_stage("pretrain", params, "--data", str(data), "--out", str(out), **_import_sets(path, digest)) == 0
    printed = capsys.readouterr().out
    assert "importing instead of training" in printed and "bn_clean -> clean, bn_adv -> adv" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert set(metrics) == {"knn_acc", "knn_random_acc", "loss"} and metrics["loss"] is None
    assert 0 <= metrics["knn_acc"] <= 1 and 0 <= metrics["knn_random_acc"] <= 1
    assert summary["epochs"] == 0 and summary["method"] == "amoc" and summary["imported"]["sha256"] == digest
    with open(out / "log.csv", newline="") as fh:
        assert list(csv.reader(fh)) == [list(COLUMNS)]  # no epoch ran
    assert (out / "checkpoints").is_dir()  # dvc.yaml's persist out exists

    # the same encoder as `amoc import-encoder` writes
    direct = tmp_path / "direct.pt"
    assert (
        cli.main(["import-encoder", "--params", str(params), "--from", "authors", str(path), "--out", str(direct)]) == 0
    )
    (a, extra), (b, _) = load_encoder_file(out / "encoder.pt"), load_encoder_file(direct)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert extra["bn_branch"] == "adv" and extra["epochs"] == 0 and extra["knn_acc"] == metrics["knn_acc"]

    # a normal pipeline input: SLF on it, evaluation, and the report
    assert (
        run_stage(
            "probe",
            params,
            "--mode",
            "slf",
            "--encoder",
            str(out / "encoder.pt"),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "runs" / "slf"),
        )
        == 0
    )
    model = tmp_path / "runs" / "slf" / "classifier.pt"
    assert run_stage("evaluate", params, "--model", str(model), "--data", str(data), "--out", str(model.parent)) == 0
    report = tmp_path / "report"
    assert cli.main(["report", "--params", str(params), "--runs", str(tmp_path / "runs"), "--out", str(report)]) == 0
    md = (report / "report.md").read_text()
    assert "| pretrain | AMOC |" in md and "n/a (imported)" in md


def test_a_file_that_is_not_the_pinned_one_is_refused(tmp_path, source, capsys):
    path, digest = source
    data = make_prepared(tmp_path / "data")
    params = params_file(tmp_path)
    out = tmp_path / "pretrain"
    other = "f" * 64
    assert run_stage("pretrain", params, "--data", str(data), "--out", str(out), **_import_sets(path, other)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"does not match {path} (sha256 {digest})" in err
    assert not out.exists() or not any(out.iterdir())
    sets = {**_import_sets(path, digest), "pretrain.from_encoder.sha256": ""}
    assert run_stage("pretrain", params, "--data", str(data), "--out", str(out), **sets) == 2
    assert "pretrain.from_encoder.sha256: '' is not a sha256 digest" in capsys.readouterr().err


# --------------------------------------------------------------------------- with DVC
def _run(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t")
    env.update(GIT_COMMITTER_EMAIL="t@localhost")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dvc_exp_run_evaluates_an_imported_encoder(tmp_path, source):
    """The documented path: `dvc exp run -S pretrain.from_encoder.path=... -S ...layout=...
    -S ...sha256=... evaluate@slf` imports the file, probes SLF on it and evaluates it; the
    same command again finds every stage up to date (the file is pinned by its sha256)."""
    path, digest = source
    ws = tmp_path / "ws"
    ws.mkdir()
    _run(str(BIN / "amoc"), "params", "--preset", "tiny", "--out", str(ws / "params.yaml"), cwd=REPO)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, ws / name)
    (ws / "imports").mkdir()
    shutil.copy(path, ws / "imports" / "paras.pt")
    for cmd in (("git", "init", "-q"), ("dvc", "init", "-q"), ("git", "add", "-A"), ("git", "commit", "-qm", "ws")):
        _run(*cmd, cwd=ws)
    sets = [f"pretrain.from_encoder.{k}={v}" for k, v in (("path", "imports/paras.pt"), ("sha256", digest))]
    args = ["dvc", "exp", "run", *(x for s in sets for x in ("-S", s)), "-S", "pretrain.from_encoder.layout=authors"]
    first = _run(*args, "evaluate@slf", cwd=ws)
    assert "Running stage 'pretrain'" in first.stdout and "Running stage 'evaluate@slf'" in first.stdout
    summary = json.loads((ws / "runs" / "pretrain" / "summary.json").read_text())
    assert summary["imported"]["sha256"] == digest and summary["epochs"] == 0
    assert json.loads((ws / "runs" / "slf" / "eval" / "metrics.json").read_text())["n"] == 64
    again = _run(*args, "evaluate@slf", cwd=ws)
    assert "Running stage" not in again.stdout, again.stdout
