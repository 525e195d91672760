"""Issue 29, items 4-6: faults under the pipeline engines, in tiny workspaces (the tiny
preset, one torch thread, tests/pipeline/test_pipeline_repro.py's workspace helpers),
targets limited to the pretrain stage.

- A stop signal to `dvc repro` mid-stage (Ctrl-C to the terminal's process group; a
  SIGTERM to the dvc process alone): the next `dvc repro` resumes the stage from its
  mid-epoch checkpoint and ends bit-identical to an uninterrupted run.
- Snakemake and its job SIGKILLed mid-rule (a lost node): the rule's outputs are flagged
  incomplete, `--rerun-incomplete` re-runs the job, which resumes from the checkpoint.
- Four queued experiments run two at a time give each the metrics and files of the same
  experiment run alone; none sees another's outputs.

Each takes 30 s to 2 min on 2 shared cores: all are `slow`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pipeline.test_pipeline_repro import BIN, _env, edit_params, make_workspace, metrics, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TIMING = {"seconds", "images_per_s"}
PRETRAIN = "runs/pretrain"


def pretrain_files(ws: Path) -> dict:
    """What the pretrain stage leaves: its metrics and summary (timings aside), log.csv
    (timing columns aside) and the bytes of encoder.pt."""
    with open(ws / PRETRAIN / "log.csv", newline="") as fh:
        log = [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]
    numbers = {k: v for k, v in metrics(ws).items() if k.startswith(PRETRAIN)}
    return {"numbers": numbers, "log": log, "encoder": (ws / PRETRAIN / "encoder.pt").read_bytes()}


def start(cmd: list[str], ws: Path) -> subprocess.Popen:
    """In a session of its own, as a terminal's foreground job: a signal to the group
    reaches the engine and the stage, as Ctrl-C does."""
    proc = subprocess.Popen(
        cmd, cwd=ws, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    STARTED.append(proc)
    return proc


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def reap():
    """The engine and its stage, if a failed test leaves them running."""
    yield
    while STARTED:
        proc = STARTED.pop()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the stage may outlive the engine
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def wait_mid_epoch_2(proc: subprocess.Popen, ws: Path, fraction: float = 0.4, timeout: float = 300) -> None:
    """Until epoch 1's checkpoint exists, then `fraction` of an epoch more."""
    deadline = time.monotonic() + timeout
    folder = ws / PRETRAIN / "checkpoints"
    while not (folder.is_dir() and list(folder.glob("epoch-0001-step-000000-*"))):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no checkpoint of epoch 1"
        time.sleep(0.05)
    with open(ws / PRETRAIN / "log.csv", newline="") as fh:
        epoch = float(next(csv.DictReader(fh))["seconds"])
    time.sleep(fraction * epoch)
    assert proc.poll() is None and not (ws / PRETRAIN / "encoder.pt").exists(), "the stage ended before the fault"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """`dvc repro pretrain`, uninterrupted."""
    ws = make_workspace(tmp_path_factory.mktemp("reference") / "ws", dvc=True)
    run("dvc", "repro", "pretrain", cwd=ws)
    return pretrain_files(ws)


# ----------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("how", ["SIGINT-to-the-group", "SIGTERM-to-dvc"])
def test_dvc_repro_stopped_mid_stage_resumes_from_its_checkpoint(reference, tmp_path, how):
    """Ctrl-C reaches dvc and the stage (dvc ignores it while a stage runs; the stage
    checkpoints and exits 130). A SIGTERM to dvc alone kills dvc; the stage, which dvc
    does not signal, sees its parent die and stops the same way (it trained on to the end
    as an orphan before)."""
    ws = make_workspace(tmp_path / "ws", dvc=True)
    proc = start(["dvc", "repro", "pretrain"], ws)
    wait_mid_epoch_2(proc, ws)
    if how == "SIGINT-to-the-group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]  # until the stage, which shares dvc's output, has exited too
    assert proc.returncode != 0, out[-3000:]
    sig = how.split("-")[0]
    stopped = re.search(
        rf"amoc pretrain: error: {sig} received: stopped at epoch 2, step (\d+); checkpoint (\S+)\.", out
    )
    assert stopped and int(stopped[1]) > 0, out[-3000:]
    assert (ws / stopped[2]).is_file() and not (ws / PRETRAIN / "encoder.pt").exists()
    assert not (ws / PRETRAIN / ".amoc.lock").exists()

    done = run("dvc", "repro", "pretrain", cwd=ws)
    again = done.stdout + done.stderr
    assert f"pretrain: resuming at epoch 2, step {stopped[1]} from" in again, again[-3000:]  # not from scratch
    assert pretrain_files(ws) == reference
    assert run("dvc", "status", "-q", "pretrain", cwd=ws, check=False).returncode == 0


# ----------------------------------------------------------------------------- item 6
def test_snakemake_and_its_job_killed_mid_rule_reruns_incomplete_and_resumes(reference, tmp_path):
    """SIGKILL to Snakemake and the job together (no cleanup runs): Snakemake's own lock
    stays (`--unlock` clears it), the rule's outputs on disk (log.csv) are flagged
    incomplete, so Snakemake refuses them as results; `--rerun-incomplete` re-runs the
    rule, which resumes from epoch 1's checkpoint (checkpoints are not outputs of the rule,
    so Snakemake keeps them)."""
    ws = make_workspace(tmp_path / "ws", dvc=False)
    target = [f"{PRETRAIN}/metrics.json"]
    proc = start([str(BIN / "snakemake"), "--cores", "1", *target], ws)
    wait_mid_epoch_2(proc, ws)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert (ws / PRETRAIN / "log.csv").is_file() and not (ws / PRETRAIN / "encoder.pt").exists()

    snakemake = [str(BIN / "snakemake"), "--cores", "1"]
    refused = run(*snakemake, *target, cwd=ws, check=False)
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "IncompleteFilesException" in text and "--rerun-incomplete" in text, text
    assert "Incomplete files:\nruns/pretrain/log.csv" in text, text
    locked = run(*snakemake, "--rerun-incomplete", *target, cwd=ws, check=False)  # the killed run's lock
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr, locked.stdout + locked.stderr
    run(*snakemake, "--unlock", cwd=ws)
    run(*snakemake, "--rerun-incomplete", *target, cwd=ws)
    assert "pretrain: resuming at epoch 2, step 0 from" in (ws / "logs" / "pretrain.log").read_text()
    assert pretrain_files(ws) == reference
    done = run(*snakemake, "-n", *target, cwd=ws)
    assert "Nothing to be done" in done.stdout + done.stderr


# ----------------------------------------------------------------------------- item 4
SEEDS = (1, 2, 3, 4)


def experiments(ws: Path, prefix: str) -> dict[int, list[dict]]:
    """{seed: [{"rev", "metrics", "encoder" md5}]} of the experiments named prefix-* in `dvc exp show`."""
    found = {}

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and str(node.get("name")).startswith(prefix) and "params" in data:
                seed = data["params"]["params.yaml"]["data"]["seed"]
                outs = data.get("outs") or {}
                found.setdefault(seed, []).append(
                    {
                        "rev": data["rev"],
                        "metrics": data["metrics"][f"{PRETRAIN}/metrics.json"]["data"],
                        "encoder": outs[f"{PRETRAIN}/encoder.pt"]["hash"],
                    }
                )
            for value in node.values():
                walk(value)

    walk(json.loads(run("dvc", "exp", "show", "--json", cwd=ws).stdout))
    return found


def committed(ws: Path, rev: str) -> dict:
    """The experiment's own summary.json and log.csv (git keeps them: cache: false)."""
    summary = json.loads(run("git", "show", f"{rev}:{PRETRAIN}/summary.json", cwd=ws).stdout)
    log = [
        {k: v for k, v in row.items() if k not in TIMING}
        for row in csv.DictReader(run("git", "show", f"{rev}:{PRETRAIN}/log.csv", cwd=ws).stdout.splitlines())
    ]
    return {"summary": {k: v for k, v in summary.items() if not re.search(r"seconds|per_s", k)}, "log": log}


def small_workspace(path: Path) -> Path:
    """The tiny workspace on 512 training images (4x faster pre-training), data prepared
    and committed, so that experiments only run pretrain."""
    ws = make_workspace(path, dvc=True)
    edit_params(ws, data={"train_limit": 512, "test_limit": 128})
    run("dvc", "repro", "download", cwd=ws)
    run("git", "add", "-A", cwd=ws)
    run("git", "commit", "-q", "-m", "data", cwd=ws)
    return ws


def test_queued_experiments_two_at_a_time_match_the_same_experiments_one_by_one(tmp_path):
    alone = small_workspace(tmp_path / "alone")  # separate workspaces: no shared run cache
    for seed in SEEDS:
        run("dvc", "exp", "run", "-n", f"alone-{seed}", "-S", f"seed={seed}", "pretrain", cwd=alone)
    queued = small_workspace(tmp_path / "queued")
    for seed in SEEDS:
        run("dvc", "exp", "run", "--queue", "-n", f"queued-{seed}", "-S", f"seed={seed}", "pretrain", cwd=queued)
    try:
        run("dvc", "queue", "start", "-j", "2", cwd=queued)
        deadline = time.monotonic() + 600
        while re.search(r"\b(Queued|Running)\b", run("dvc", "queue", "status", cwd=queued).stdout):
            assert time.monotonic() < deadline, "the queue did not finish"
            time.sleep(2)
        status = run("dvc", "queue", "status", cwd=queued).stdout
        assert status.count("Success") == len(SEEDS), status
    finally:
        run("dvc", "queue", "stop", "--kill", cwd=queued, check=False)

    one, two = experiments(alone, "alone-"), experiments(queued, "queued-")
    assert sorted(one) == sorted(two) == list(SEEDS), (one, two)
    assert all(len(one[s]) == len(two[s]) == 1 for s in SEEDS), (one, two)
    for seed in SEEDS:
        a, b = one[seed][0], two[seed][0]
        assert b["metrics"] == a["metrics"], seed
        assert b["encoder"] == a["encoder"], seed  # the same encoder.pt, byte for byte (md5)
        assert committed(queued, b["rev"]) == committed(alone, a["rev"]), seed  # summary.json, log.csv
    # four different results, so that an experiment holding another's files would show above
    assert len({two[s][0]["encoder"] for s in SEEDS}) == len({str(two[s][0]["metrics"]) for s in SEEDS}) == 4
