"""AutoAttack: the original code (pyautoattack) beside torchattacks' port.

- both on one small robust classifier give the same robust accuracy within a stated
  tolerance (the two draw different random starts, so not image for image);
- amoc's driver of the original's attacks gives exactly the flags of the original's own
  `run_standard_evaluation` (the same batches, seeds and order);
- a run killed in the middle resumes from its state file without recomputing a
  finished attack or batch, and ends with the flags of an uninterrupted run; the stage
  does so after a real SIGKILL;
- eval.json records which implementation ran, its version, the seed and the robust
  accuracy after each attack.

CPU budget: APGD/FAB iterations and Square queries are reduced (as in
test_evaluate_attacks.py); the attacks, their order and the counting are the standard
ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from downstream_helpers import params_file, robust_classifier

from amoc.attacks import autoattack, autoattack_original
from amoc.config import RuntimeConfig
from amoc.data.prepared import load_split
from amoc.nets.classifier import load_classifier
from amoc.runtime import setup

pyautoattack = pytest.importorskip("pyautoattack")  # a dependency of amoc: installed with it

STEPS, QUERIES = 20, 500
N_COMPARE = 256
TOLERANCE = 2.0  # percentage points: 5 of 256 images; the two implementations differ only in random draws


@pytest.fixture(scope="module")
def robust(tmp_path_factory):
    path, data = robust_classifier(tmp_path_factory)
    model = load_classifier(path).requires_grad_(False)
    x, y = load_split(data, "test")
    return {"path": path, "data": data, "model": model, "x": x, "y": y}


@pytest.fixture()
def rt():
    return setup(RuntimeConfig(device="cpu", progress=False, threads=1), 0, evaluation=True)


@pytest.fixture()
def small(monkeypatch):
    monkeypatch.setattr(autoattack, "AUTOATTACK_STEPS", STEPS)
    monkeypatch.setattr(autoattack, "AUTOATTACK_QUERIES", QUERIES)


def _original(robust, rt, n, state_path=None, batch_size=64):
    return autoattack_original.run(
        robust["model"],
        robust["x"][:n],
        robust["y"][:n],
        device=rt.device,
        batch_size=batch_size,
        eps=8 / 255,
        seed=0,
        steps=STEPS,
        queries=QUERIES,
        targets=3,
        state_path=state_path,
    )


def test_both_implementations_agree_on_one_classifier(robust, rt, small, capsys):
    x, y = robust["x"][:N_COMPARE], robust["y"][:N_COMPARE]
    results, seconds = {}, {}
    for impl in ("original", "torchattacks"):
        t0 = time.perf_counter()
        results[impl] = autoattack.run_autoattack(robust["model"], x, y, rt, 128, 8 / 255, 4, seed=0, impl=impl)
        seconds[impl] = time.perf_counter() - t0
    acc = {k: 100 * r.correct.float().mean().item() for k, r in results.items()}
    steps = {k: [a["robust_acc"] for a in r.per_attack] for k, r in results.items()}
    with capsys.disabled():
        print(f"\nAutoAttack on {N_COMPARE} images (iterations {STEPS}, Square {QUERIES} queries):")
        for k in results:
            print(f"  {k}: {acc[k]:.2f} % in {seconds[k]:.1f} s, after each attack {steps[k]}")
    clean = 100 * float((robust["model"](x.float() / 255).argmax(1) == y).float().mean())
    assert 5 < acc["original"] < clean - 5, "robust accuracy must be non-trivial for the comparison to mean anything"
    assert abs(acc["original"] - acc["torchattacks"]) <= TOLERANCE, acc
    for k, r in results.items():
        assert [a["attack"] for a in r.per_attack] == ["apgd-ce", "apgd-t", "fab-t", "square"]
        assert steps[k] == sorted(steps[k], reverse=True) and steps[k][-1] == pytest.approx(acc[k], abs=0.01)
        assert r.worst <= 8 / 255 + 1e-6
    assert results["original"].implementation["package"] == "pyautoattack"
    assert results["torchattacks"].implementation["package"] == "torchattacks"


def test_the_driver_is_the_original_evaluation_loop(robust, rt):
    """The same images, batch size and seed through the original's own
    run_standard_evaluation: the same robust images, one by one."""
    n, bs = 64, 16
    ours = _original(robust, rt, n, batch_size=bs)
    aa = autoattack_original.build(robust["model"], 8 / 255, rt.device, 0, STEPS, QUERIES, 3)
    x = robust["x"][:n].float() / 255
    _, y_adv = aa.run_standard_evaluation(x, robust["y"][:n], batch_size=bs)
    theirs = y_adv == robust["y"][:n]
    assert torch.equal(ours["robust"], theirs)
    assert 0 < int(theirs.sum()) < n


def test_a_killed_run_resumes_without_recomputing(robust, rt, tmp_path, monkeypatch):
    n, bs = 64, 16
    clean_run = _original(robust, rt, n, batch_size=bs)
    state = tmp_path / "state.pt"
    calls: list[str] = []
    real = autoattack_original._perturb

    def counting(aa, attack, x, y):
        calls.append(attack)
        if kill_at is not None and len(calls) == kill_at:
            raise KeyboardInterrupt  # a kill in the middle of a batch of FAB-T
        return real(aa, attack, x, y)

    monkeypatch.setattr(autoattack_original, "_perturb", counting)
    kill_at = None
    _original(robust, rt, n, batch_size=bs)  # how many batches each attack takes, uninterrupted
    per_attack = {a: calls.count(a) for a in autoattack_original.ATTACKS}
    assert per_attack["fab-t"] >= 2, per_attack
    calls.clear()
    kill_at = per_attack["apgd-ce"] + per_attack["apgd-t"] + 2  # the second batch of FAB-T
    with pytest.raises(KeyboardInterrupt):
        _original(robust, rt, n, state_path=state, batch_size=bs)
    assert state.is_file()
    calls.clear()
    kill_at = None
    resumed = _original(robust, rt, n, state_path=state, batch_size=bs)
    # APGD-CE, APGD-T and FAB-T's first batch are not recomputed
    assert calls.count("apgd-ce") == calls.count("apgd-t") == 0
    assert calls.count("fab-t") == per_attack["fab-t"] - 1 and calls.count("square") == per_attack["square"]
    assert resumed["resumed"] == {"attacks_done": ["apgd-ce", "apgd-t"], "current": "fab-t", "next_batch": 1}
    assert torch.equal(resumed["robust"], clean_run["robust"])
    assert [d["robust"] for d in resumed["per_attack"]] == [d["robust"] for d in clean_run["per_attack"]]


def test_a_state_of_other_settings_is_not_used(robust, rt, tmp_path):
    state = tmp_path / "state.pt"
    first = _original(robust, rt, 32, state_path=state)
    assert state.is_file() and first["resumed"] is None
    other = autoattack_original.run(
        robust["model"],
        robust["x"][:32],
        robust["y"][:32],
        device=rt.device,
        batch_size=64,
        eps=4 / 255,  # another budget: a fresh run
        seed=0,
        steps=STEPS,
        queries=QUERIES,
        targets=3,
        state_path=state,
    )
    assert other["resumed"] is None


EVALUATE = """
import sys
from amoc import cli
from amoc.attacks import autoattack
autoattack.AUTOATTACK_STEPS, autoattack.AUTOATTACK_QUERIES = {steps}, {queries}
sys.exit(cli.main({argv!r}))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_stage_resumes_after_sigkill_and_records_what_ran(robust, tmp_path):
    """`amoc evaluate` SIGKILLed once APGD-CE is done: the same command again resumes
    (says so, does not recompute APGD-CE) and writes the eval.json of
    an uninterrupted run, which names the implementation, its version, the seed and the
    robust accuracy after each attack."""
    params = params_file(tmp_path)
    sets = {
        "evaluate.n_images": 256,
        "evaluate.autoattack": "true",
        "evaluate.autoattack_impl": "original",
        "evaluate.batch_size": 16,
        "evaluate.curve_eps": "[0]",
        "runtime.threads": 1,
        "runtime.progress": "false",
    }
    argv = ["evaluate", "--params", str(params)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    argv += ["--model", str(robust["path"]), "--data", str(robust["data"])]

    def command(out):
        code = EVALUATE.format(steps=STEPS, queries=QUERIES, argv=argv + ["--out", str(out)])
        return [sys.executable, "-c", code]

    ref = tmp_path / "ref"
    subprocess.run(command(ref), check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    state = out / ".autoattack-state-last.pt"
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                blob = torch.load(state, weights_only=True)
            except Exception:  # being replaced: read it again
                blob = {}
            if len(blob.get("done", [])) >= 1:  # APGD-CE is done: kill it in what follows
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (out / "eval.json").exists() and state.is_file()
    again = subprocess.run(command(out), check=True, capture_output=True, text=True, timeout=600)
    assert "AutoAttack resumed from" in again.stdout and "apgd-ce" in again.stdout
    assert not state.exists()  # finished: no state left behind

    result, reference = (json.loads((d / "eval.json").read_text()) for d in (out, ref))
    assert result["autoattack_resumed"]["attacks_done"][0] == "apgd-ce" and reference["autoattack_resumed"] is None
    for r in (result, reference):
        r.pop("throughput")
        for part in (r, r["best"]):  # classifier_best.pt: the same weights here, the same numbers
            part.pop("autoattack_resumed")
    assert result == reference
    aa = result["settings"]["autoattack"]
    assert aa["implementation"]["name"] == "original" and aa["implementation"]["package"] == "pyautoattack"
    assert aa["implementation"]["version"] == pyautoattack.__version__ and aa["seed"] == result["settings"]["seed"] == 1
    assert aa["library"] == f"pyautoattack {pyautoattack.__version__}" and aa["resumable"] is True
    steps = result["autoattack_per_attack"]
    assert [s["attack"] for s in steps] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert steps[-1]["robust_acc"] == result["autoattack_acc"]
