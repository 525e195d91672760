"""`amoc pretrain` end to end: outputs, exact resume, stops, numerical errors."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from pretrain_utils import write_prepared

from amoc import cli, io
from amoc.io import torch_load
from amoc.nets.store import load_encoder
from amoc.pretrain import stage
from amoc.pretrain.step import TrainStep

TIMING = ("seconds", "images_per_s")
# 40 images / batch 8 = 5 steps per epoch, 3 epochs, ACA+ with a 2-step attack.
SETS = [
    "runtime.device=cpu",
    "runtime.threads=1",
    "pretrain.batch_size=8",
    "pretrain.epochs=3",
    "pretrain.checkpoint_every=1",
    "pretrain.knn_k=5",
    "queue_size=20",
    "pretrain.queue_size_adv=12",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared")


def pretrain(params: Path, data: Path, out: Path, *sets: str, resume: bool = False) -> int:
    argv = ["pretrain", "--params", str(params), "--data", str(data), "--out", str(out)]
    for item in [*SETS, *sets]:
        argv += ["--set", item]
    return cli.main(argv + (["--resume"] if resume else []))


def read_log(out: Path) -> list[dict[str, str]]:
    with open(out / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def final_state(out: Path) -> dict:
    paths = sorted((out / "checkpoints").glob("epoch-*.pt"))
    return torch_load(paths[-1])


@pytest.fixture(scope="module")
def reference(params, prepared, tmp_path_factory) -> Path:
    """One uninterrupted run that the resumed runs must reproduce exactly."""
    out = tmp_path_factory.mktemp("reference")
    assert pretrain(params, prepared, out) == 0
    return out


def test_outputs(reference):
    rows = read_log(reference)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["epoch", "loss", "loss_clean", "loss_adv", "lr", "images_per_s", "seconds", "knn_acc"]
    assert rows[0]["knn_acc"] == rows[1]["knn_acc"] == ""  # knn_every = 0: at the end only
    assert 0.0 <= float(rows[2]["knn_acc"]) <= 1.0
    for r in rows:
        assert float(r["loss"]) == pytest.approx(0.5 * float(r["loss_clean"]) + 0.5 * float(r["loss_adv"]), rel=1e-5)
    metrics = json.loads((reference / "summary.json").read_text())
    assert metrics["variant"] == "ACA+" and metrics["queue_size"] == 20 and metrics["queue_size_adv"] == 12
    assert metrics["epochs"] == 3 and metrics["knn_bn_branch"] == "adv"
    for key in ("knn_acc", "loss", "loss_clean", "loss_adv", "images_per_s", "seconds"):
        assert isinstance(metrics[key], float), key
    assert metrics["loss"] == float(rows[2]["loss"]) and metrics["knn_acc"] == float(rows[2]["knn_acc"])
    headline = json.loads((reference / "metrics.json").read_text())  # what DVC compares: nothing else
    assert headline == {k: metrics[k] for k in ("knn_acc", "knn_random_acc", "loss")}
    assert 0.0 <= headline["knn_random_acc"] <= 1.0 and 0.0 <= metrics["knn_random_bn_acc"] <= 1.0
    assert metrics["log_k_plus_1"] == pytest.approx(math.log(21))
    assert metrics["method"] == "amoc" and metrics["chance_loss"] == metrics["log_k_plus_1"]
    encoder = load_encoder(reference / "encoder.pt")
    blob = torch_load(reference / "encoder.pt")
    assert blob["extra"] == {
        "bn_branch": "adv",
        "method": "amoc",
        "variant": "ACA+",
        "queue_size": 20,
        "queue_size_adv": 12,
        "epochs": 3,
        "seed": 1,
        "leverage": 0.5,
        "knn_acc": metrics["knn_acc"],
    }
    assert encoder.width == 0.0625
    # the encoder file is the query encoder of the final checkpoint
    model = final_state(reference)["model"]
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, model[f"query.encoder.{name}"]), name
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert [n[:22] for n in names] == ["epoch-0002-step-000000", "epoch-0003-step-000000"]  # the newest 2 kept
    assert not (reference / ".amoc.lock").exists()


def _interrupt_at(monkeypatch, call: int, how: str) -> None:
    """Make the `call`-th training step end with SIGINT, or crash in it."""
    original = TrainStep.__call__
    count = {"n": 0}

    def step(self, *args):
        count["n"] += 1
        if how == "crash" and count["n"] == call:
            raise RuntimeError("simulated crash")
        out = original(self, *args)
        if how == "signal" and count["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(TrainStep, "__call__", step)


@pytest.mark.parametrize(
    "how,call",
    [("signal", 5), ("signal", 7), ("crash", 8)],
    ids=["stop-end-of-epoch-1", "stop-mid-epoch-2", "crash-in-epoch-2"],
)
def test_exact_resume(params, prepared, reference, tmp_path, monkeypatch, capsys, how, call):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, call, how)
        if how == "signal":
            assert pretrain(params, prepared, out) == 130
            err = capsys.readouterr().err
            assert "--resume" in err and "SIGINT" in err
            state = final_state(out)
            # a stop after an epoch's last step finishes that epoch: a boundary checkpoint
            expected = (call // 5, 0) if call % 5 == 0 else ((call - 1) // 5, (call - 1) % 5 + 1)
            assert (state["epoch"], state["step"]) == expected
        else:
            with pytest.raises(RuntimeError, match="simulated crash"):
                pretrain(params, prepared, out)
    assert not (out / "encoder.pt").exists()
    assert pretrain(params, prepared, out, resume=True) == 0
    assert "resuming at epoch" in capsys.readouterr().err
    expected, got = final_state(reference), final_state(out)
    assert expected["model"].keys() == got["model"].keys()
    for name, value in expected["model"].items():  # weights, BN statistics, queues, pointers
        assert torch.equal(value, got["model"][name]), name
    for a, b in zip(expected["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert without_timing(read_log(out)) == without_timing(read_log(reference))
    ref_metrics = json.loads((reference / "summary.json").read_text())
    metrics = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in metrics.items() if k not in TIMING} == {
        k: v for k, v in ref_metrics.items() if k not in TIMING
    }


def test_a_checkpoint_older_than_the_bn_baseline_resumes_without_it(
    params, prepared, reference, tmp_path, monkeypatch, capsys
):
    """Checkpoints written before knn_random_bn existed do not hold it. The resumed run must
    not measure it on half-trained weights: summary.json holds null and the stage's line
    says n/a, while the initial-statistics baseline comes from the checkpoint."""
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 5, "signal")  # stops after epoch 1: a boundary checkpoint
        assert pretrain(params, prepared, out) == 130
    path = sorted((out / "checkpoints").glob("epoch-*.pt"))[-1]
    blob = torch_load(path)
    del blob["knn_random_bn"]
    io.torch_save(path, blob)
    capsys.readouterr()
    assert pretrain(params, prepared, out, resume=True) == 0
    assert "n/a with the training views' BN statistics" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["knn_random_bn_acc"] is None
    headline = json.loads((out / "metrics.json").read_text())
    assert headline["knn_random_acc"] == json.loads((reference / "metrics.json").read_text())["knn_random_acc"]


def test_resume_without_checkpoint_starts_fresh(params, prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(params, prepared, out, "pretrain.epochs=1", "variant=CCC", resume=True) == 0
    assert "no usable checkpoint" in capsys.readouterr().err
    assert len(read_log(out)) == 1


def test_resume_with_another_config_starts_fresh(params, prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(params, prepared, out, "pretrain.epochs=1", "variant=CCC") == 0
    capsys.readouterr()
    assert pretrain(params, prepared, out, "pretrain.epochs=1", "variant=CCC", "leverage=0.3", resume=True) == 0
    err = capsys.readouterr().err
    assert "starting fresh" in err
    assert len(read_log(out)) == 1


def test_ccc_has_no_adversarial_loss_and_uses_clean_bn(params, prepared, tmp_path):
    out = tmp_path / "run"
    assert pretrain(params, prepared, out, "pretrain.epochs=1", "variant=CCC") == 0
    metrics = json.loads((out / "summary.json").read_text())
    assert metrics["loss_adv"] is None and metrics["knn_bn_branch"] == "clean"
    assert metrics["loss"] == metrics["loss_clean"]
    assert read_log(out)[0]["loss_adv"] == ""
    assert torch_load(out / "encoder.pt")["extra"]["bn_branch"] == "clean"


def test_nan_stops_and_keeps_the_last_good_checkpoint(params, prepared, tmp_path, monkeypatch, capsys):
    original = TrainStep.__call__
    count = {"n": 0}

    def step(self, *args):
        count["n"] += 1
        out = original(self, *args)
        if count["n"] >= 7:  # epoch 2
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(TrainStep, "__call__", step)
    out = tmp_path / "run"
    assert pretrain(params, prepared, out) == 3
    assert "non-finite loss" in capsys.readouterr().err
    assert [p.name[:22] for p in (out / "checkpoints").iterdir()] == ["epoch-0001-step-000000"]
    assert not (out / "encoder.pt").exists() and not (out / "metrics.json").exists()


def test_train_set_smaller_than_a_batch(params, tmp_path, capsys):
    data = write_prepared(tmp_path / "prepared", n_train=5)
    assert pretrain(params, data, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "5 training images" in err and "pretrain.batch_size=4" in err


def test_epoch_order():
    a = stage.epoch_order(1, 0, 50)
    assert torch.equal(a, stage.epoch_order(1, 0, 50))
    assert torch.equal(a.sort().values, torch.arange(50))
    assert not torch.equal(a, stage.epoch_order(1, 1, 50)) and not torch.equal(a, stage.epoch_order(2, 0, 50))


def test_bf16_autocast_and_channels_last_path(params, prepared, tmp_path):
    """The GPU settings (bf16 autocast, channels_last) run end to end, here on the CPU."""
    out = tmp_path / "run"
    assert (
        pretrain(
            params,
            prepared,
            out,
            "pretrain.epochs=1",
            "runtime.precision=bf16",
            "runtime.channels_last=on",
            "variant=AAA",
        )
        == 0
    )
    metrics = json.loads((out / "summary.json").read_text())
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss", "loss_clean", "loss_adv", "knn_acc"))


def test_a_loss_sitting_at_log_k_plus_1_is_warned_about(params, prepared, tmp_path, capsys):
    """At T = 1000 every logit is ~0: the loss is log(K+1) whatever the network does, the
    situation the warning is for (from the second epoch on; the first may still be warming up)."""
    assert pretrain(params, prepared, tmp_path / "flat", "model.temperature=1000") == 0
    err = capsys.readouterr().err
    assert err.count("sits at log(K+1)") == 2 and "epoch 2's loss_clean" in err and "epoch 1's" not in err
