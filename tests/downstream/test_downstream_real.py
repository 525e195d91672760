"""Real data: the CIFAR-10 subset through download -> pretrain -> SLF probe -> evaluate."""

from __future__ import annotations

import json

import pytest
from conftest import SUBSET_SHA256
from downstream_helpers import params_file

from amoc import cli

pytestmark = pytest.mark.slow


def test_slf_probe_on_a_briefly_pretrained_encoder_beats_chance(shared_data, tmp_path):
    params = params_file(tmp_path)  # the tiny preset: width 0.0625, tiny queue, 2-step attacks
    data, pre, slf = tmp_path / "data", tmp_path / "pretrain", tmp_path / "slf"
    common = ["--params", str(params), "--set", "runtime.threads=1", "--set", "runtime.progress=false"]
    assert (
        cli.main(
            [
                "download",
                *common,
                "--set",
                f"data.source={shared_data}/cifar-10-python-subset.tar.gz",
                "--set",
                f"data.sha256={SUBSET_SHA256}",
                "--set",
                "data.name=cifar10",
                "--set",
                "data.train_limit=2000",
                "--out",
                str(data),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "pretrain",
                *common,
                "--set",
                "pretrain.epochs=2",
                "--set",
                "pretrain.warmup_epochs=0",
                "--data",
                str(data),
                "--out",
                str(pre),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "probe",
                *common,
                "--mode",
                "slf",
                "--set",
                "probe.epochs=10",
                "--set",
                "probe.milestones=[7]",
                "--set",
                "probe.batch_size=128",
                "--encoder",
                str(pre / "encoder.pt"),
                "--data",
                str(data),
                "--out",
                str(slf),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "evaluate",
                *common,
                "--set",
                "evaluate.n_images=0",
                "--set",
                "evaluate.autoattack=false",
                "--set",
                "evaluate.batch_size=256",
                "--model",
                str(slf / "classifier.pt"),
                "--data",
                str(data),
                "--out",
                str(slf),
            ]
        )
        == 0
    )
    result = json.loads((slf / "eval.json").read_text())
    n = result["n_images"]
    assert n == 1017  # the whole test part of the subset, ~100 images per class
    # chance is 10% (sd ~0.9 points at n = 1017); a random encoder's probe stays at ~10% here
    assert result["clean_acc"] > 16.0, result
    assert result["pgd_acc"] <= result["clean_acc"]
