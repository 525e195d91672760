"""`amoc evaluate`: our PGD against torchattacks', AutoAttack <= PGD <= clean, eval.json."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from downstream_helpers import params_file, robust_classifier, run_stage

from amoc.attacks import autoattack
from amoc.attacks.accuracy import correct
from amoc.config import AttackConfig, RuntimeConfig
from amoc.data.prepared import load_split
from amoc.evaluate import attacks as evaluate
from amoc.nets.classifier import load_classifier
from amoc.runtime import setup


@pytest.fixture(scope="module")
def robust(tmp_path_factory):
    """A tiny network adversarially trained for a few epochs, and its test set."""
    path, data = robust_classifier(tmp_path_factory)
    model = load_classifier(path).requires_grad_(False)
    x, y = load_split(data, "test")
    return {"path": path, "data": data, "model": model, "x": x, "y": y}


@pytest.mark.parametrize("random_start", [False, True])
def test_our_pgd20_agrees_with_torchattacks(robust, random_start):
    import torchattacks

    model, x, y = robust["model"], robust["x"], robust["y"]
    n = len(x)
    assert n >= 500  # 1 percentage point = 5 images or more
    rt = setup(RuntimeConfig(device="cpu", progress=False, threads=1), 0, evaluation=True)  # fp32, as the stage
    attack = AttackConfig(eps=8 / 255, step_ratio=0.25, steps=20, random_start=random_start)
    clean = correct(model, x, y, rt, 256)
    ours = evaluate.pgd_correct(model, x, y, rt, 256, attack, seed=0) & clean
    torch.manual_seed(0)
    ta = torchattacks.PGD(model, eps=attack.eps, alpha=attack.step_size, steps=20, random_start=random_start)
    theirs = []
    for xb, yb in zip((x.float() / 255).split(256), y.split(256)):
        adv = ta(xb, yb)
        with torch.no_grad():
            theirs.append(model(adv).argmax(1) == yb)
    theirs = torch.cat(theirs) & clean
    acc_clean, acc_ours, acc_theirs = (100 * t.float().mean().item() for t in (clean, ours, theirs))
    print(
        f"clean {acc_clean:.2f}%, ours {acc_ours:.2f}%, torchattacks {acc_theirs:.2f}%, per-image agreement "
        f"{100 * (ours == theirs).float().mean():.2f}%"
    )
    assert 5 < acc_ours < acc_clean - 5, (
        "the model must have non-trivial robust accuracy for this test to mean anything"
    )
    assert abs(acc_ours - acc_theirs) <= 1.0, (acc_clean, acc_ours, acc_theirs)
    if not random_start:  # deterministic: the same attack, up to float rounding in the projection
        assert (ours == theirs).float().mean() >= 0.99


def test_autoattack_uses_the_official_iteration_counts(robust):
    aa = autoattack.build_autoattack(robust["model"], 8 / 255, num_classes=4, seed=0)
    subs = {type(a).__name__: a for a in aa._autoattack.attacks}
    assert set(subs) == {"APGD", "APGDT", "FAB", "Square"}
    assert subs["APGD"].steps == subs["APGDT"].steps == subs["FAB"].steps == 100
    assert subs["Square"].n_queries == 5000 and subs["FAB"].multi_targeted
    assert subs["Square"].rescale_schedule is False  # the original's fixed schedule
    assert subs["APGDT"].n_target_classes == subs["FAB"].n_target_classes == 3  # fewer than 9 classes besides y


def test_autoattack_targets_9_classes_on_cifar_100():
    """The original standard AutoAttack runs APGD-T and FAB-T with 9 target classes on
    every data set; torchattacks would take all 99 on CIFAR-100 (11x the cost, another attack)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 100))
    aa = autoattack.build_autoattack(model, 8 / 255, num_classes=100, seed=0)
    subs = {type(a).__name__: a for a in aa._autoattack.attacks}
    assert subs["APGDT"].n_target_classes == subs["FAB"].n_target_classes == 9


def test_evaluate_stage_writes_settings_counts_and_an_ordered_result(robust, tmp_path, monkeypatch, capsys):
    # CPU budget (Square's 5000 queries alone take ~15 s here); the stage records what ran
    monkeypatch.setattr(autoattack, "AUTOATTACK_STEPS", 10)
    monkeypatch.setattr(autoattack, "AUTOATTACK_QUERIES", 300)
    out = tmp_path / "eval"
    params = params_file(tmp_path)
    assert (
        run_stage(
            "evaluate",
            params,
            "--model",
            str(robust["path"]),
            "--data",
            str(robust["data"]),
            "--out",
            str(out),
            **{
                "evaluate.n_images": 40,
                "evaluate.autoattack_images": 0,
                "evaluate.autoattack": True,
                "evaluate.batch_size": 32,
                "evaluate.pgd.steps": 20,
                "evaluate.curve_eps": [0, 4, 8],
            },
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "images/s" in printed and "AutoAttack" in printed
    result = json.loads((out / "eval.json").read_text())
    assert result["autoattack_acc"] <= result["pgd_acc"] <= result["clean_acc"]
    assert result["pgd_acc"] < result["clean_acc"]
    s = result["settings"]
    assert result["n_images"] == s["clean"]["n_images"] == s["pgd"]["n_images"] == 40
    assert s["autoattack"]["n_images"] == 40  # autoattack_images 0 = n_images
    assert s["autoattack"]["iterations"] == 10 and s["autoattack"]["square_queries"] == 300
    assert s["autoattack"]["square_rescale_schedule"] is False
    assert (
        s["pgd"]["steps"] == 20 and s["pgd"]["eps_255"] == pytest.approx(8) and s["pgd"]["step_255"] == pytest.approx(2)
    )
    assert s["pgd"]["random_start"] is True and s["seed"] == 0 and s["model"] == str(robust["path"])
    assert s["autoattack"]["max_perturbation_255"] <= 8 + 1e-3 and s["bn_branch"] == "adv"
    assert result["subset"]["n_images"] == 40 and result["throughput"]["autoattack_images_per_s"] > 0
    # metrics.json: the headline numbers only (what dvc exp show / metrics diff compare)
    assert json.loads((out / "metrics.json").read_text()) == {
        "clean": result["clean_acc"],
        "pgd": result["pgd_acc"],
        "autoattack": result["autoattack_acc"],
        "n": 40,
        "n_autoattack": 40,
    }
    with open(out / "curve.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["eps_255"]) for r in rows] == [0, 4, 8] and all(r["n_images"] == "40" for r in rows)
    assert float(rows[0]["accuracy"]) == result["clean_acc"] and float(rows[2]["accuracy"]) == result["pgd_acc"]
    assert float(rows[2]["eps"]) == pytest.approx(8 / 255)


def test_the_best_epoch_classifier_is_evaluated_beside_the_last(robust, tmp_path):
    """classifier_best.pt next to the model: the same weights reuse the last epoch's numbers;
    other weights are attacked on their own."""
    import shutil

    from amoc.nets.classifier import save_classifier

    params = params_file(tmp_path)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(robust["path"], models / "classifier.pt")
    shutil.copy(robust["path"].with_name("classifier_best.pt"), models / "classifier_best.pt")
    sets = {"evaluate.n_images": 64, "evaluate.autoattack": False, "evaluate.batch_size": 64}
    assert (
        run_stage(
            "evaluate",
            params,
            "--model",
            str(models / "classifier.pt"),
            "--data",
            str(robust["data"]),
            "--out",
            str(tmp_path / "same"),
            **sets,
        )
        == 0
    )
    same = json.loads((tmp_path / "same" / "eval.json").read_text())
    assert same["best"]["same_as_last"] is True
    assert (same["best"]["clean_acc"], same["best"]["pgd_acc"]) == (same["clean_acc"], same["pgd_acc"])
    other = load_classifier(robust["path"])
    with torch.no_grad():
        other.head.weight.mul_(-1)  # a much worse classifier
    save_classifier(models / "classifier_best.pt", other, {"epoch": 2, "selected_by": "val_pgd_acc"})
    assert (
        run_stage(
            "evaluate",
            params,
            "--model",
            str(models / "classifier.pt"),
            "--data",
            str(robust["data"]),
            "--out",
            str(tmp_path / "other"),
            **sets,
        )
        == 0
    )
    result = json.loads((tmp_path / "other" / "eval.json").read_text())
    assert result["best"]["same_as_last"] is False and result["best"]["epoch"] == 2
    assert result["best"]["clean_acc"] < result["clean_acc"] and result["clean_acc"] == same["clean_acc"]


def test_evaluate_is_deterministic_and_0_means_all_images(robust, tmp_path):
    params = params_file(tmp_path)
    results = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            run_stage(
                "evaluate",
                params,
                "--model",
                str(robust["path"]),
                "--data",
                str(robust["data"]),
                "--out",
                str(out),
                **{"evaluate.n_images": 0, "evaluate.batch_size": 200},
            )
            == 0
        )
        result = json.loads((out / "eval.json").read_text())
        result.pop("throughput")
        results.append((result, (out / "curve.csv").read_text()))
    assert results[0] == results[1]
    assert results[0][0]["n_images"] == len(robust["x"]) and results[0][0]["autoattack_acc"] is None
    assert results[0][0]["settings"]["autoattack"]["n_images"] == 0


def test_autoattack_accepts_channels_last_models(robust, tmp_path, monkeypatch):
    """channels_last (the CUDA default) must reach torchattacks as plain NCHW: FAB uses .view()."""
    monkeypatch.setattr(autoattack, "AUTOATTACK_STEPS", 2)
    monkeypatch.setattr(autoattack, "AUTOATTACK_QUERIES", 5)
    results = []
    for layout in ("on", "off"):
        out = tmp_path / layout
        assert (
            run_stage(
                "evaluate",
                params_file(tmp_path),
                "--model",
                str(robust["path"]),
                "--data",
                str(robust["data"]),
                "--out",
                str(out),
                **{
                    "runtime.channels_last": layout,
                    "evaluate.n_images": 24,
                    "evaluate.autoattack": True,
                    "evaluate.curve_eps": [0],
                },
            )
            == 0
        )
        result = json.loads((out / "eval.json").read_text())
        results.append((result["clean_acc"], result["autoattack_acc"]))
    assert results[0] == results[1]
