"""`amoc probe` / `amoc finetune`: what trains, what stays frozen, outputs, exact resume."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from downstream_helpers import make_prepared, params_file, random_encoder, run_stage

from amoc import config
from amoc.downstream import trainer
from amoc.nets import DualBatchNorm2d
from amoc.nets.classifier import load_classifier, read_classifier
from amoc.nets.store import load_encoder, save_encoder
from amoc.training import loop


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Prepared data, an encoder whose two BN branches hold distinct, non-default
    statistics (so 'unchanged' means something), and a params file."""
    root = tmp_path_factory.mktemp("train")
    data = make_prepared(root / "data", n_train=128, n_test=64)
    enc_path = random_encoder(root / "encoder.pt")
    encoder = load_encoder(enc_path)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, DualBatchNorm2d):
                for bn in (m.clean, m.adv):
                    bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=g))
                    bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
    save_encoder(enc_path, encoder, extra={"bn_branch": "adv"})
    return {"root": root, "data": data, "encoder": enc_path, "params": params_file(root)}


def encoder_state(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_encoder(path).state_dict().items()}


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("mode,alf_loss", [("slf", "trades"), ("alf", "trades"), ("alf", "pgd_at")])
def test_probe_trains_only_the_head(setup, mode, alf_loss):
    out = setup["root"] / f"probe-{mode}-{alf_loss}"
    assert (
        run_stage(
            "probe",
            setup["params"],
            "--mode",
            mode,
            "--encoder",
            str(setup["encoder"]),
            "--data",
            str(setup["data"]),
            "--out",
            str(out),
            **{"probe.loss": alf_loss},
        )
        == 0
    )
    model, prov = read_classifier(out / "classifier.pt")
    before = encoder_state(setup["encoder"])
    after = model.encoder.state_dict()
    assert before.keys() == after.keys()
    for key in before:  # weights, both BN branches' running stats and counters
        assert torch.equal(before[key], after[key]), key
    assert model.head.weight.abs().sum() > 0 and model.bn_branch == "adv"
    rows = read_log(out / "log.csv")
    assert list(rows[0]) == list(trainer.LOG_COLUMNS) and [r["epoch"] for r in rows] == ["1", "2"]
    lr = config.load(setup["params"]).probe.lr  # the tiny preset's
    assert [float(r["lr"]) for r in rows] == pytest.approx([lr, lr / 10])  # milestone at epoch 1
    metrics = json.loads((out / "summary.json").read_text())
    assert metrics["epochs"] == 2 and metrics["mode"] == mode and metrics["n_train"] == 128
    assert metrics["loss_fn"] == ("ce" if mode == "slf" else alf_loss)
    assert metrics["train_loss"] == pytest.approx(float(rows[-1]["loss"]))
    assert prov["stage"] == "probe" and prov["spec"]["weight_decay"] == (2e-4 if mode == "slf" else 5e-4)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_aff_trains_the_encoder_on_the_adv_branch(setup):
    out = setup["root"] / "aff"
    assert (
        run_stage(
            "finetune",
            setup["params"],
            "--init",
            str(setup["encoder"]),
            "--data",
            str(setup["data"]),
            "--out",
            str(out),
        )
        == 0
    )
    before = encoder_state(setup["encoder"])
    after = load_classifier(out / "classifier.pt").encoder.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "conv1.weight" in changed and "layer4.1.conv2.weight" in changed
    assert "bn1.adv.running_mean" in changed and "bn1.adv.weight" in changed
    # train mode on the adversarial branch: the clean branch's statistics never move
    assert not any(".clean.running_" in k for k in changed)
    assert json.loads((out / "summary.json").read_text())["mode"] == "aff"


def test_scratch_builds_the_encoder_from_params_and_data_stats(setup):
    out = setup["root"] / "scratch"
    assert (
        run_stage(
            "finetune",
            setup["params"],
            "--init",
            "scratch",
            "--data",
            str(setup["data"]),
            "--out",
            str(out),
            **{"model.width": 0.125},
        )
        == 0
    )
    blob = torch.load(out / "classifier.pt", weights_only=True)
    stats = json.loads((setup["data"] / "stats.json").read_text())
    assert blob["encoder"]["width"] == 0.125
    assert blob["encoder"]["mean"] == pytest.approx(stats["mean"]) and blob["encoder"]["std"] == pytest.approx(
        stats["std"]
    )
    assert blob["provenance"]["init"] == "scratch" and blob["bn_branch"] == "adv"


def _state(out: Path) -> dict[str, torch.Tensor]:
    return load_classifier(out / "classifier.pt").state_dict()


def _probe(setup, out: Path, *extra: str) -> int:
    return run_stage(
        "probe",
        setup["params"],
        "--mode",
        "alf",
        "--encoder",
        str(setup["encoder"]),
        "--data",
        str(setup["data"]),
        "--out",
        str(out),
        *extra,
        **{"probe.batch_size": 32},
    )


def test_probe_resumes_exactly_after_a_stop_and_from_an_epoch_checkpoint(setup, monkeypatch):
    reference = setup["root"] / "resume-ref"
    assert _probe(setup, reference) == 0
    ref_state, ref_log = _state(reference), read_log(reference / "log.csv")

    # (1) SIGTERM during epoch 2 (step 2 of 4): mid-epoch checkpoint, exit 130, then --resume
    class StopAfter:
        """Stands in for StopSignals: a signal "arrives" on the 7th check: 4 step checks + 1
        epoch-end check in epoch 1, then epoch 2, step 2."""

        def __init__(self) -> None:
            self.checks = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        @property
        def requested(self):
            self.checks += 1
            return "SIGTERM" if self.checks >= 7 else None

    out = setup["root"] / "resume-stop"
    monkeypatch.setattr(loop, "StopSignals", StopAfter)
    assert _probe(setup, out) == 130
    assert not (out / "classifier.pt").exists()
    (newest,) = (out / "checkpoints").glob("epoch-0001-step-000002-*.pt")
    blob = torch.load(newest, weights_only=True)
    assert (blob["epoch"], blob["step"]) == (1, 2)
    monkeypatch.undo()
    assert _probe(setup, out, "--resume") == 0
    state = _state(out)
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    assert [r["loss"] for r in read_log(out / "log.csv")] == [r["loss"] for r in ref_log]

    # (2) lose the last epoch's checkpoint and outputs, resume from epoch 1
    (last,) = (out / "checkpoints").glob("epoch-0002-step-000000-*.pt")
    last.unlink()
    (out / "classifier.pt").unlink()
    assert _probe(setup, out, "--resume") == 0
    state = _state(out)
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


def test_resume_ignores_a_checkpoint_of_another_config(setup, capsys):
    out = setup["root"] / "resume-other"
    assert _probe(setup, out) == 0
    old = set((out / "checkpoints").iterdir())
    capsys.readouterr()
    assert (
        run_stage(
            "probe",
            setup["params"],
            "--mode",
            "alf",
            "--encoder",
            str(setup["encoder"]),
            "--data",
            str(setup["data"]),
            "--out",
            str(out),
            "--resume",
            **{"probe.batch_size": 32, "probe.lr": 0.05},
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "no usable checkpoint" in captured.err and "starting fresh" in captured.err
    assert "resuming" not in captured.err
    assert "probe alf epoch 1/2" in captured.out
    assert not old & set((out / "checkpoints").iterdir())  # the stale config's files are gone


def test_a_checkpoint_written_on_a_gpu_starts_fresh_on_the_cpu_with_one_note(setup, monkeypatch, capsys):
    """Moving a DVC workspace between machines: every stage runs with --resume, and a
    probe checkpoint written on a GPU holds a CUDA generator state (16 bytes: seed and
    offset) that a CPU generator cannot take. The device type is part of the resume
    fingerprint, so that checkpoint is set aside with a note, never loaded."""
    reference = setup["root"] / "device-ref"
    assert _probe(setup, reference) == 0
    calls = []
    real = trainer.run_fingerprint

    def recording(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(trainer, "run_fingerprint", recording)
    out = setup["root"] / "device-moved"
    assert _probe(setup, out) == 0
    monkeypatch.undo()
    (args,) = calls
    rt = args[-1]
    on_gpu = real(*args[:-1], dataclasses.replace(rt, device=torch.device("cuda", 0)))
    assert on_gpu != real(*args)

    # What the same run on a GPU would have left: its epoch-1 checkpoint, nothing after it.
    (first,) = (out / "checkpoints").glob("epoch-0001-step-000000-*.pt")
    blob = torch.load(first, weights_only=True)
    blob["fingerprint"] = on_gpu
    blob["rng"]["generators"] = [torch.zeros(16, dtype=torch.uint8)]  # a CUDA generator's state
    for path in (out / "checkpoints").iterdir():
        path.unlink()
    torch.save(blob, out / "checkpoints" / f"epoch-0001-step-000000-{on_gpu}.pt")
    (out / "classifier.pt").unlink()
    capsys.readouterr()

    assert _probe(setup, out, "--resume") == 0
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "device type" in err and "starting fresh" in err, err
    state, ref_state = _state(out), _state(reference)
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


def test_validation_split_logs_each_epoch_and_keeps_the_best_epoch(setup, monkeypatch):
    """val_images held out of training: per-epoch clean and PGD accuracy in log.csv, and
    classifier_best.pt holds the epoch with the best validation PGD accuracy (TRADES)."""
    out = setup["root"] / "finetune-val"
    assert (
        run_stage(
            "finetune",
            setup["params"],
            "--init",
            str(setup["encoder"]),
            "--data",
            str(setup["data"]),
            "--out",
            str(out),
            **{"finetune.epochs": 3, "finetune.val_images": 32},
        )
        == 0
    )
    rows = read_log(out / "log.csv")
    val = [float(r["val_pgd_acc"]) for r in rows]
    assert all(r["val_acc"] != "" for r in rows) and all(0 <= v <= float(r["val_acc"]) for v, r in zip(val, rows))
    metrics = json.loads((out / "summary.json").read_text())
    assert metrics["n_train"] == 128 - 32 and metrics["n_val"] == 32  # held out, not trained on
    best_epoch = val.index(max(val)) + 1  # the first epoch with the highest validation PGD accuracy
    assert metrics["best_epoch"] == best_epoch and metrics["selected_by"] == "val_pgd_acc"
    assert metrics["best_val_pgd_acc"] == pytest.approx(max(val), abs=1e-4)
    last, last_prov = read_classifier(out / "classifier.pt")
    best, best_prov = read_classifier(out / "classifier_best.pt")
    assert last_prov["checkpoint"] == "last" and last_prov["epoch"] == 3
    assert best_prov["checkpoint"] == "best" and best_prov["epoch"] == best_epoch
    same = all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), best.state_dict().values()))
    assert same == (best_epoch == 3)


def test_validation_off_writes_the_last_epoch_as_best(setup):
    out = setup["root"] / "probe-noval"
    assert (
        run_stage(
            "probe",
            setup["params"],
            "--mode",
            "slf",
            "--encoder",
            str(setup["encoder"]),
            "--data",
            str(setup["data"]),
            "--out",
            str(out),
        )
        == 0
    )
    assert all(r["val_acc"] == "" for r in read_log(out / "log.csv"))
    _, prov = read_classifier(out / "classifier_best.pt")
    assert prov["epoch"] == 2 and prov["selected_by"].startswith("none")


@pytest.mark.slow
def test_compile_works_for_the_classifier_stages(setup):
    """runtime.compile: the probe and fine-tuning run through torch.compile (inductor on the
    CPU) and learn what the eager run learns, up to the compiler's float rounding."""
    logs = {}
    for compiled in (False, True):
        out = setup["root"] / f"finetune-compile-{compiled}"
        assert (
            run_stage(
                "finetune",
                setup["params"],
                "--init",
                str(setup["encoder"]),
                "--data",
                str(setup["data"]),
                "--out",
                str(out),
                **{"runtime.compile": compiled, "finetune.loss": "pgd_at"},
            )
            == 0
        )
        logs[compiled] = [float(r["loss"]) for r in read_log(out / "log.csv")]
    assert logs[True] == pytest.approx(logs[False], rel=1e-3)
