"""`amoc pretrain` with pretrain.method acl, rocl and dynacl end to end (docs/methods.md):
outputs that name the method, exact resume after a stop, and the encoder through the
downstream stages; DynACL's schedules at a period boundary; and a method name that does
not exist."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from downstream_helpers import make_prepared

from amoc import cli
from amoc.io import torch_load
from amoc.nets.store import load_encoder_file
from amoc.pretrain.acl import ACLStep
from amoc.pretrain.dynacl import DynACLStep
from amoc.pretrain.rocl import RoCLStep
from amoc.pretrain.stage import Pretraining

STEPS = {"acl": ACLStep, "rocl": RoCLStep, "dynacl": DynACLStep}
# 40 images / batch 8 = 5 steps per epoch, 3 epochs, 2-step attacks, narrow projectors;
# DynACL's schedules step every epoch (period 1), so a resumed epoch has its own strength.
SETS = [
    "runtime.device=cpu",
    "runtime.threads=1",
    "pretrain.batch_size=8",
    "pretrain.epochs=3",
    "pretrain.warmup_epochs=1",
    "pretrain.checkpoint_every=1",
    "pretrain.knn_k=5",
    "pretrain.acl.projector=[32, 32, 32]",
    "pretrain.acl.attack.steps=2",
    "pretrain.rocl.projector=[64, 16]",
    "pretrain.rocl.attack.steps=2",
    "pretrain.dynacl.projector=[32, 32, 32]",
    "pretrain.dynacl.attack.steps=2",
    "pretrain.dynacl.period=1",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("data") / "prepared", n_train=40, n_test=32)


def pretrain(params: Path, data: Path, out: Path, method: str, *extra: str) -> int:
    argv = ["pretrain", "--params", str(params), "--data", str(data), "--out", str(out)]
    for item in [*SETS, f"pretrain.method={method}"]:
        argv += ["--set", item]
    return cli.main(argv + list(extra))


def newest(out: Path) -> dict:
    return torch_load(sorted((out / "checkpoints").glob("epoch-*.pt"))[-1])


@pytest.fixture(scope="module")
def references(params, prepared, tmp_path_factory) -> dict[str, Path]:
    made = {}
    for method in STEPS:
        made[method] = tmp_path_factory.mktemp(f"reference-{method}")
        assert pretrain(params, prepared, made[method], method) == 0
    return made


@pytest.mark.parametrize("method", sorted(STEPS))
def test_outputs_name_the_method_and_leave_amocs_keys_empty(references, method):
    out = references[method]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["variant"] is None and summary["queue_size"] is None
    assert summary["log_k_plus_1"] is None and summary["epochs"] == 3 and summary["knn_bn_branch"] == "adv"
    assert summary["chance_loss"] > 0 and isinstance(summary["loss_adv"], float)
    assert json.loads((out / "metrics.json").read_text()).keys() == {"knn_acc", "knn_random_acc", "loss"}
    assert 0.0 <= summary["knn_random_bn_acc"] <= 1.0
    encoder, extra = load_encoder_file(out / "encoder.pt")
    assert extra["method"] == method and extra["bn_branch"] == "adv" and extra["variant"] is None
    model = newest(out)["model"]
    prefix = "key.encoder." if method == "dynacl" else "encoder."  # DynACL: the EMA key net's encoder
    for name, value in encoder.state_dict().items():  # the encoder file is the trained encoder
        assert torch.equal(value, model[f"{prefix}{name}"]), name
    mean = encoder.normalize.mean.flatten().tolist()
    assert mean == pytest.approx([0.0, 0.0, 0.0] if method == "rocl" else [0.485, 0.456, 0.406])
    if method == "dynacl":  # the key net is an EMA, not the query net, and records its momentum
        assert summary["key_momentum"] == extra["key_momentum"] == 0.99
        weights = [k for k in model if k.startswith("query.encoder.") and k.endswith("weight")]
        assert weights and all(k.replace("query.", "key.", 1) in model for k in weights)
        assert any(not torch.equal(model[k], model[k.replace("query.", "key.", 1)]) for k in weights)
    if method == "rocl":  # one BN: the clean branch never trains
        fresh = torch.load(sorted((out / "checkpoints").glob("*.pt"))[0], weights_only=True)["model"]
        clean = [k for k in model if ".clean." in k and k.endswith(("weight", "bias"))]
        assert clean and all(torch.equal(model[k], fresh[k]) for k in clean)


@pytest.mark.parametrize("method", sorted(STEPS))
def test_exact_resume_after_a_stop_mid_epoch(params, prepared, references, tmp_path, monkeypatch, capsys, method):
    out, original, count = tmp_path / method, STEPS[method].__call__, {"n": 0}

    def step(self, *args):
        result = original(self, *args)
        count["n"] += 1
        if count["n"] == 7:  # epoch 2, step 2
            os.kill(os.getpid(), signal.SIGINT)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(STEPS[method], "__call__", step)
        assert pretrain(params, prepared, out, method) == 130
    assert (newest(out)["epoch"], newest(out)["step"]) == (1, 2)
    assert pretrain(params, prepared, out, method, "--resume") == 0
    assert "resuming at epoch 2, step 2" in capsys.readouterr().err
    expected, got = newest(references[method]), newest(out)
    for name, value in expected["model"].items():
        assert torch.equal(value, got["model"][name]), name
    for a, b in zip(expected["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    timing = ("seconds", "images_per_s")
    summary = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if k not in timing}
    ref = {k: v for k, v in json.loads((references[method] / "summary.json").read_text()).items() if k not in timing}
    assert summary == ref


@pytest.mark.parametrize("method", sorted(STEPS))
def test_the_encoder_goes_through_the_probes_fine_tuning_and_evaluation(params, prepared, references, tmp_path, method):
    enc, data = references[method] / "encoder.pt", str(prepared)
    sets = [
        "runtime.device=cpu",
        "probe.epochs=1",
        "probe.milestones=[]",
        "probe.batch_size=16",
        "probe.attack.steps=1",
        "probe.val_images=0",
        "finetune.epochs=1",
        "finetune.milestones=[]",
        "finetune.batch_size=16",
        "finetune.attack.steps=1",
        "finetune.val_images=0",
        "evaluate.n_images=16",
        "evaluate.pgd.steps=2",
        "evaluate.autoattack=false",
        "evaluate.curve_eps=[0, 8]",
    ]
    flags = [a for s in sets for a in ("--set", s)]
    common = ["--params", str(params), "--data", data, *flags]
    for mode in ("slf", "alf"):
        assert cli.main(["probe", "--mode", mode, "--encoder", str(enc), "--out", str(tmp_path / mode), *common]) == 0
    assert cli.main(["finetune", "--init", str(enc), "--out", str(tmp_path / "aff"), *common]) == 0
    for model in ("slf", "alf", "aff"):
        out = tmp_path / f"eval-{model}"
        assert (
            cli.main(["evaluate", "--model", str(tmp_path / model / "classifier.pt"), "--out", str(out), *common]) == 0
        )
        metrics = json.loads((out / "metrics.json").read_text())
        assert 0 <= metrics["pgd"] <= metrics["clean"] <= 100 and metrics["n"] == 16
    assert json.loads((tmp_path / "aff" / "summary.json").read_text())["bn_branch"] == "adv"


def test_an_unknown_method_is_one_line_and_writes_nothing(params, prepared, tmp_path, capsys):
    out = tmp_path / "simclr"
    assert pretrain(params, prepared, out, "simclr") == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "amoc pretrain: error: pretrain.method: 'simclr' is not allowed; choose one of amoc, acl, rocl, dynacl"
    )
    assert not out.exists()


def test_dynacl_switches_its_views_and_weight_at_a_period_boundary(params, prepared, tmp_path, monkeypatch):
    """Period 2 over 3 epochs: epochs 0 and 1 draw views at strength 1, epoch 2 at
    1 - 2/3 (crop scale (0.7, 1), a third of the jitter); the stage's augmentation is
    rebuilt once, at the boundary. The weight steps an epoch earlier, as in their code:
    1 in epoch 0, then 1 + (2/3)(2/3)."""
    seen, original = [], Pretraining.train_step

    def train_step(self, epoch, step):
        aug = self.augment
        seen.append((epoch, id(aug), aug.scale, aug.cfg.jitter_p, tuple(aug.cfg.jitter), self.method.step.weight))
        return original(self, epoch, step)

    monkeypatch.setattr(Pretraining, "train_step", train_step)
    assert pretrain(params, prepared, tmp_path / "out", "dynacl", "--set", "pretrain.dynacl.period=2") == 0
    by_epoch = {e: {s[1:] for s in seen if s[0] == e} for e in range(3)}
    assert all(len(v) == 1 for v in by_epoch.values())  # fixed within an epoch
    (a0, scale0, p0, jitter0, w0), (a1, scale1, p1, _, w1), (a2, scale2, p2, jitter2, w2) = (
        next(iter(by_epoch[e])) for e in range(3)
    )
    assert a0 == a1 != a2  # rebuilt at the boundary only
    assert scale0 == scale1 == pytest.approx((0.1, 1.0)) and p0 == p1 == pytest.approx(0.8)
    assert scale2 == pytest.approx((0.7, 1.0)) and p2 == pytest.approx(0.8 / 3)
    assert jitter2 == pytest.approx([v / 3 for v in jitter0])
    assert (w0, w1, w2) == pytest.approx((1.0, 1 + 4 / 9, 1 + 4 / 9))
