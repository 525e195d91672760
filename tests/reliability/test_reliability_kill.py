"""Issue #8: real processes killed, stopped and raced (`amoc pretrain`, `amoc probe`).

Every run here is a subprocess (`python -m amoc ...`, one thread), so the signals are
real: SIGKILL mid-epoch (no handler runs, a stale lock stays behind), SIGTERM/SIGINT
(checkpoint then exit 130), a second run on the same --out. The resumed runs must end
bit-identical to one uninterrupted run: every tensor of encoder.pt / classifier.pt
(torch.equal), log.csv and summary.json with the timing columns removed.

Sizes: 96 synthetic 16x16 images, batch 8 = 12 steps per epoch, 4 epochs (~0.1 s/step).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pretrain_utils import write_prepared

from amoc import cli
from amoc.io import torch_load

TIMING = {"seconds", "images_per_s"}
PRETRAIN_SETS = [
    "runtime.device=cpu",
    "runtime.threads=1",
    "runtime.progress=false",
    "pretrain.batch_size=8",
    "pretrain.epochs=4",
    "pretrain.checkpoint_every=1",
    "pretrain.knn_k=5",
    "queue_size=24",
    "pretrain.queue_size_adv=16",
]
PROBE_SETS = [
    "runtime.device=cpu",
    "runtime.threads=1",
    "runtime.progress=false",
    "probe.batch_size=8",
    "probe.epochs=4",
    "probe.milestones=[2]",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 120


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def params(root) -> Path:
    path = root / "tiny.yaml"
    assert cli.main(["params", "--preset", "tiny", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def data(root) -> Path:
    return write_prepared(root / "prepared", n_train=96, n_test=24)


def argv(stage: str, params: Path, out: Path, *extra: str, sets=()) -> list[str]:
    cmd = [sys.executable, "-m", "amoc", stage, "--params", str(params), "--out", str(out), *extra]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def pretrain_cmd(params: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return argv("pretrain", params, out, "--data", str(data), *extra, sets=PRETRAIN_SETS)


def probe_cmd(params: Path, data: Path, encoder: Path, out: Path, *extra: str) -> list[str]:
    return argv(
        "probe", params, out, "--mode", "slf", "--encoder", str(encoder), "--data", str(data), *extra, sets=PROBE_SETS
    )


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err


def run(cmd: list[str]) -> tuple[int, str, str]:
    return finish(start(cmd))


def checkpoints(out: Path) -> list[Path]:
    """Complete epoch checkpoints (temp files start with '.'), oldest first."""
    folder = out / "checkpoints"
    return sorted(folder.glob("epoch-*.pt")) if folder.is_dir() else []


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def interrupt(proc: subprocess.Popen, out: Path, sig: int, *, n_checkpoints: int = 1, delay: float = 0.0) -> None:
    """Send `sig` once `n_checkpoints` epoch checkpoints exist plus `delay` seconds
    (a fraction of an epoch), asserting the run was still going when it arrived."""
    wait_for(proc, lambda: len(checkpoints(out)) >= n_checkpoints, f"{n_checkpoints} checkpoint(s) in {out}")
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before the signal; make it longer"
    proc.send_signal(sig)


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


def read_metrics(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING}


def assert_same_run(got: Path, expected: Path, weights: str) -> None:
    """Bit-identical weights file, log.csv and summary.json (timings aside), no lock left."""
    a, b = torch_load(expected / weights)["state_dict"], torch_load(got / weights)["state_dict"]
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), f"{weights}: {name} differs from the uninterrupted run"
    assert read_log(got / "log.csv") == read_log(expected / "log.csv")
    assert read_metrics(got / "summary.json") == read_metrics(expected / "summary.json")
    assert not (got / ".amoc.lock").exists()


def epoch_seconds(reference: Path) -> float:
    with open(reference / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return sum(float(r["seconds"]) for r in rows) / len(rows)


@pytest.fixture(scope="module")
def reference(params, data, root) -> Path:
    """One uninterrupted pretrain run that every interrupted one must reproduce."""
    out = root / "reference"
    code, _, err = run(pretrain_cmd(params, data, out))
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def probe_reference(params, data, reference, root) -> Path:
    out = root / "probe-reference"
    code, _, err = run(probe_cmd(params, data, reference / "encoder.pt", out))
    assert code == 0, err
    return out


# ----------------------------------------------------------------------------- SIGKILL
@pytest.mark.parametrize("first_with_resume", [False, True], ids=["then-resume", "pipeline-rerun"])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(params, data, reference, tmp_path, first_with_resume):
    """then-resume: `amoc pretrain`, SIGKILL, `amoc pretrain --resume`. pipeline-rerun:
    dvc.yaml's command (it always has --resume) killed and simply run again. The
    SIGKILLed run leaves its lock file behind (no handler runs): the next run takes it over."""
    out = tmp_path / "run"
    first = pretrain_cmd(params, data, out, *(["--resume"] if first_with_resume else []))
    proc = start(first)
    interrupt(proc, out, signal.SIGKILL, delay=0.4 * epoch_seconds(reference))
    assert finish(proc)[0] == -signal.SIGKILL
    assert (out / ".amoc.lock").read_text().strip() == str(proc.pid)  # stale lock of a dead process
    assert not (out / "encoder.pt").exists() and not (out / "metrics.json").exists()
    code, _, err = run(pretrain_cmd(params, data, out, "--resume"))
    assert code == 0, err
    assert "resuming at epoch" in err
    assert_same_run(out, reference, "encoder.pt")
    assert not list(out.rglob(".*.tmp")), "a temp file of the killed run is left over"


def test_truncated_newest_checkpoint_falls_back_and_still_matches(params, data, reference, tmp_path):
    """Killed after two epoch checkpoints; the newest is then truncated (a disk that lost
    the tail): resume warns naming the file, uses the older one, ends identical."""
    out = tmp_path / "run"
    proc = start(pretrain_cmd(params, data, out))
    interrupt(proc, out, signal.SIGKILL, n_checkpoints=2, delay=0.2 * epoch_seconds(reference))
    finish(proc)
    newest = checkpoints(out)[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    code, _, err = run(pretrain_cmd(params, data, out, "--resume"))
    assert code == 0, err
    assert f"warning: {newest}: truncated or corrupt file" in err and "falling back" in err
    assert_same_run(out, reference, "encoder.pt")


# ----------------------------------------------------------------------------- SIGTERM / SIGINT
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_checkpoints_exits_130_and_resumes_identically(params, data, reference, tmp_path, sig):
    out = tmp_path / "run"
    proc = start(pretrain_cmd(params, data, out))
    interrupt(proc, out, sig, delay=0.3 * epoch_seconds(reference))
    code, _, err = finish(proc)
    assert code == 130, err
    name = signal.Signals(sig).name
    assert f"{name} received: stopped at epoch" in err and "--resume" in err
    newest = checkpoints(out)[-1]
    blob = torch_load(newest)
    assert str(newest) in err  # the message names the checkpoint it wrote
    assert blob["step"] > 0 or blob["epoch"] >= 2  # a mid-epoch checkpoint (or the next boundary)
    assert not (out / "encoder.pt").exists() and not (out / ".amoc.lock").exists()
    code, _, err = run(pretrain_cmd(params, data, out, "--resume"))
    assert code == 0, err
    assert_same_run(out, reference, "encoder.pt")


# ----------------------------------------------------------------------------- downstream
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_probe_killed_or_stopped_then_resumed_is_bit_identical(params, data, reference, probe_reference, tmp_path, sig):
    out = tmp_path / "probe"
    cmd = probe_cmd(params, data, reference / "encoder.pt", out, "--resume")  # as dvc.yaml runs it
    proc = start(cmd)
    interrupt(proc, out, sig, delay=0.4 * epoch_seconds(probe_reference))
    code, _, err = finish(proc)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130), err
    assert not (out / "classifier.pt").exists()
    code, _, err = run(cmd)
    assert code == 0, err
    assert "resuming at epoch" in err
    assert_same_run(out, probe_reference, "classifier.pt")


# ----------------------------------------------------------------------------- concurrency
def test_second_run_on_the_same_out_is_refused_and_the_first_finishes(params, data, reference, tmp_path):
    out = tmp_path / "run"
    first = start(pretrain_cmd(params, data, out))
    wait_for(
        first,
        lambda: (out / ".amoc.lock").is_file() and (out / ".amoc.lock").read_text().strip(),
        "the first run's lock",
    )
    t0 = time.monotonic()
    code, _, err = run(pretrain_cmd(params, data, out, "--resume"))
    assert code == 2
    assert err.strip() == (
        f"amoc pretrain: error: {out}: another amoc run (pid {first.pid}) is writing here; "
        "wait for it or stop it, or use another output folder"
    )
    assert time.monotonic() - t0 < 30  # at once: it does not wait for the lock
    code, _, err = finish(first)
    assert code == 0, err
    assert_same_run(out, reference, "encoder.pt")


# ----------------------------------------------------------------------------- NaN
def test_exploding_lr_exits_3_naming_epoch_step_and_loss(params, data, tmp_path):
    """lr=1e30: the losses overflow in epoch 1. Exit 3, a message naming the losses, the
    epoch and the step, no encoder.pt/metrics.json and no checkpoint holding NaNs.
    (Keeping the last *good* checkpoint when the NaN comes in a later epoch is covered by
    test_pretrain_stage.py::test_nan_stops_and_keeps_the_last_good_checkpoint.)"""
    out = tmp_path / "run"
    code, _, err = run(pretrain_cmd(params, data, out, "--set", "pretrain.lr=1e30"))
    assert code == 3, err
    (line,) = err.strip().splitlines()
    assert line.startswith("amoc pretrain: error: non-finite loss") and "at epoch 1, step 12" in line
    assert "the last good checkpoint is kept" in line
    assert not (out / "encoder.pt").exists() and not (out / "metrics.json").exists()
    assert checkpoints(out) == [] and not (out / ".amoc.lock").exists()
