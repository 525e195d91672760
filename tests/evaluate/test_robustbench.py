"""`amoc robustbench`: RobustBench's model-info JSON from `amoc evaluate`.

The slow test runs RobustBench's own `benchmark()` (robustbench 1.1.1 from PyPI,
offline) on a tiny amoc classifier of the embedded digits images and requires the same
clean and AutoAttack accuracy, and the same JSON fields, as `amoc evaluate` + `amoc
robustbench`. robustbench 1.1.1 installs here but does not import as published
(docs/robustbench.md): its `loaders.py` imports `pkg_resources`, which setuptools 84
no longer ships, and its `eval.py` imports `autoattack` (fra31's package, which its
GitHub setup.py installs from git) while the PyPI wheel depends on `pyautoattack`, the
same code under another module name with a keyword-only API (`batch_size=` for `bs=`, no
`log_path`, returns `(x_adv, y_adv)`). The test supplies the two modules (a stand-in
`pkg_resources`, an `autoattack` that forwards to pyautoattack and fixes the seed that
robustbench leaves to the clock) and serves the prepared test images in CIFAR-10's
on-disk format, with torchvision's md5 checks and download of that folder off (and
any connection attempt an error); everything else is
robustbench's code: its data loader, clean_accuracy, the original AutoAttack's
run_standard_evaluation, update_json.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from downstream_helpers import params_file, run_stage

from amoc import cli
from amoc.evaluate.robustbench import FIELDS, FOR_THE_SUBMITTER, rb_accuracy
from amoc.nets.classifier import load_classifier

NAME = "Amoc2026Tiny"
N_TEST = 40  # the prepared "full test set": RobustBench's AutoAttack at its standard settings, on a CPU
SEED = 0  # amoc evaluate's (the tests' params); robustbench leaves AutoAttack's to the clock


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, digits_dir):
    """A tiny PGD-AT classifier of the digits (10 classes: the standard 9 target classes),
    and `amoc evaluate` on a test split of N_TEST images with the standard AutoAttack."""
    root = tmp_path_factory.mktemp("rb")
    data = root / "data"
    data.mkdir()
    for name in ("train.npz", "stats.json"):
        shutil.copy(digits_dir / name, data / name)
    test = np.load(digits_dir / "test.npz")
    np.savez(data / "test.npz", x=test["x"][:N_TEST], y=test["y"][:N_TEST])
    params = params_file(root)
    model = root / "scratch" / "classifier.pt"
    sets = {"finetune.epochs": 4, "finetune.milestones": [3], "finetune.loss": "pgd_at", "finetune.lr": 0.1}
    assert (
        run_stage("finetune", params, "--init", "scratch", "--data", str(data), "--out", str(model.parent), **sets) == 0
    )
    out = root / "eval"
    sets = {
        "evaluate.n_images": 0,
        "evaluate.autoattack": True,
        "evaluate.autoattack_images": 0,
        "evaluate.autoattack_impl": "original",
        "evaluate.batch_size": 64,
        "evaluate.curve_eps": [0],
    }
    assert run_stage("evaluate", params, "--model", str(model), "--data", str(data), "--out", str(out), **sets) == 0
    return {"root": root, "data": data, "model": model, "eval": out, "params": params}


def export(ev, out: Path, *extra: str) -> int:
    return cli.main(
        ["robustbench", "--params", str(ev["params"]), "--eval", str(ev["eval"]), "--data", str(ev["data"])]
        + ["--name", NAME, "--out", str(out), *extra]
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_export_writes_robustbench_model_info(evaluated, tmp_path, capsys):
    assert export(evaluated, tmp_path / "model_info") == 0
    info = json.loads((tmp_path / "model_info" / "digits" / "Linf" / f"{NAME}.json").read_text())
    result = json.loads((evaluated["eval"] / "eval.json").read_text())
    assert list(info) == list(FIELDS)
    assert info["clean_acc"] == rb_accuracy(result["clean_acc"], N_TEST)
    assert info["autoattack_acc"] == rb_accuracy(result["autoattack_acc"], N_TEST)
    assert (info["eps"], info["number_forward_passes"], info["dataset"]) == ("8/255", 1, "digits")
    assert info["architecture"] == "ResNet-18 (width 0.0625)"
    assert all(info[k] is None for k in FOR_THE_SUBMITTER)
    printed = capsys.readouterr().out
    assert "fill in link, name, authors" in printed and "RobustBench's leaderboards take cifar10" in printed


def test_export_refuses_a_partial_or_reduced_evaluation(tmp_path, capsys, monkeypatch):
    """No AutoAttack, fewer images than the test split, or reduced AutoAttack settings:
    one error line each, nothing written."""
    from downstream_helpers import make_prepared, random_encoder

    from amoc.attacks import autoattack

    monkeypatch.setattr(autoattack, "AUTOATTACK_STEPS", 2)
    monkeypatch.setattr(autoattack, "AUTOATTACK_QUERIES", 5)
    data = make_prepared(tmp_path / "data", n_train=64, n_test=24)
    enc = random_encoder(tmp_path / "enc.pt")
    params = params_file(tmp_path)
    slf = tmp_path / "slf"
    probe = {"probe.epochs": 1, "probe.milestones": []}
    assert (
        run_stage(
            "probe", params, "--mode", "slf", "--encoder", str(enc), "--data", str(data), "--out", str(slf), **probe
        )
        == 0
    )
    cases = [
        ({"evaluate.n_images": 0}, "ran without AutoAttack"),
        ({"evaluate.n_images": 16, "evaluate.autoattack": True}, "AutoAttack on 16 of the 24 test images"),
        ({"evaluate.n_images": 0, "evaluate.autoattack": True, "evaluate.autoattack_images": 0}, "not the standard"),
    ]
    for i, (sets, words) in enumerate(cases):
        ev = {"params": params, "eval": tmp_path / f"ev{i}", "data": data}
        common = ("--model", str(slf / "classifier.pt"), "--data", str(data), "--out", str(ev["eval"]))
        assert run_stage("evaluate", params, *common, **sets, **{"evaluate.curve_eps": [0]}) == 0
        capsys.readouterr()
        assert export(ev, tmp_path / "mi") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not (tmp_path / "mi").exists()


# --------------------------------------------------------------------------- robustbench itself
def _cifar_folder(data: Path, root: Path) -> Path:
    """The prepared test split as torchvision's CIFAR-10 folder (rows of 3 x 32 x 32 uint8)."""
    test = np.load(data / "test.npz")
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": test["x"].reshape(len(test["x"]), -1), "labels": test["y"].tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, fh)
    return root


@pytest.fixture()
def robustbench_offline(monkeypatch):
    """robustbench 1.1.1 importable here: the two modules it imports that this
    environment cannot give it as published (module docstring), nothing else changed."""
    import pyautoattack  # amoc's dependency; robustbench is a dev one (pyproject.toml): both installed
    from pyautoattack.state import EvaluationState

    assert importlib.util.find_spec("robustbench") is not None, "pip install -e .[dev] installs robustbench"

    class AutoAttack:  # fra31's API, as robustbench calls it, on pyautoattack's object
        def __init__(self, model, norm="Linf", eps=0.3, seed=None, version="standard", device="cpu", log_path=None):
            self.inner = pyautoattack.AutoAttack(
                model, norm=norm, eps=eps, version=version, device=device, seed=SEED if seed is None else seed
            )

        def run_standard_evaluation(self, x, y, bs=250, return_labels=False, state_path=None):
            x_adv, y_adv = self.inner.run_standard_evaluation(x, y, batch_size=bs, state_path=state_path)
            return (x_adv, y_adv) if return_labels else x_adv

    autoattack = types.ModuleType("autoattack")
    state = types.ModuleType("autoattack.state")
    autoattack.AutoAttack, state.EvaluationState, autoattack.state = AutoAttack, EvaluationState, state
    pkg_resources = types.ModuleType("pkg_resources")
    pkg_resources.resource_filename = lambda package, name: str(Path(sys.modules[package].__file__).parent / name)
    for name, module in (("autoattack", autoattack), ("autoattack.state", state), ("pkg_resources", pkg_resources)):
        monkeypatch.setitem(sys.modules, name, module)
    for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")]:
        monkeypatch.delitem(sys.modules, name)
    import torchvision.datasets.cifar

    # the folder holds our test images, not the official files: their md5s cannot match, and
    # nothing is to be downloaded (any connection attempt fails the test)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: None)
    monkeypatch.setattr(
        torchvision.datasets.CIFAR10,
        "_check_integrity",  # the test split only (benchmark() reads no other)
        lambda self: all((Path(self.root) / self.base_folder / name).is_file() for name, _ in self.test_list),
    )

    def offline(*args, **kwargs):
        raise AssertionError("robustbench tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", offline)
    from robustbench import benchmark

    yield benchmark
    for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")]:
        del sys.modules[name]  # imported with the stand-ins: not for other tests


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_robustbench_benchmark_reports_what_amoc_evaluate_does(evaluated, tmp_path, monkeypatch, robustbench_offline):
    import torch

    rb_data = _cifar_folder(evaluated["data"], tmp_path / "rbdata")
    monkeypatch.chdir(tmp_path)  # benchmark(to_disk=True) writes ./model_info/...
    model = load_classifier(evaluated["model"]).requires_grad_(False)
    torch.set_num_threads(1)
    clean, robust = robustbench_offline(
        model,
        n_examples=N_TEST,
        dataset="cifar10",
        threat_model="Linf",
        to_disk=True,
        model_name=NAME,
        data_dir=str(rb_data),
        device=torch.device("cpu"),
        batch_size=64,
        eps=8 / 255,
    )
    theirs = json.loads((tmp_path / "model_info" / "cifar10" / "Linf" / f"{NAME}.json").read_text())
    assert export(evaluated, tmp_path / "ours") == 0
    ours = json.loads((tmp_path / "ours" / "digits" / "Linf" / f"{NAME}.json").read_text())
    result = json.loads((evaluated["eval"] / "eval.json").read_text())
    assert result["settings"]["seed"] == SEED
    print(f"robustbench: clean {theirs['clean_acc']}, AutoAttack {theirs['autoattack_acc']}; amoc: {ours}")
    assert 0 < robust < clean  # a classifier with something to attack
    assert theirs["clean_acc"] == ours["clean_acc"] == str(round(100 * clean, 2))
    assert theirs["autoattack_acc"] == ours["autoattack_acc"] == str(round(100 * robust, 2))
    assert float(ours["clean_acc"]) == result["clean_acc"] and float(ours["autoattack_acc"]) == result["autoattack_acc"]
    assert list(theirs) == list(ours)  # the same fields, in the same order
    assert theirs["eps"] == pytest.approx(8 / 255) and ours["eps"] == "8/255"
