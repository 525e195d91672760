"""Data-parallel runs (amoc.distributed) on the CPU with gloo and 2 processes.

What must hold (issue: scale-out): the queues are identical on every rank and made of
the gathered keys in rank order; a 2-process run with global batch B follows the loss
curve of a 1-process run with batch B; only rank 0 writes; a checkpoint resumes under
another world size. Runs here take seconds: 64 synthetic 16 x 16 images, batch 16.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_helpers import run_pretrain
from pretrain_utils import write_prepared

from amoc import cli, config
from amoc.distributed import Dist, Shard
from amoc.errors import ConfigError
from amoc.pretrain.stage import Pretraining
from amoc.schedule import scaled_lr

# 64 images / global batch 16 = 4 steps per epoch, 2 epochs; a queue of 3 batches wraps.
SETS = [
    "runtime.device=cpu",
    "runtime.threads=1",
    "variant=ACA+",
    "pretrain.batch_size=16",
    "pretrain.epochs=2",
    "pretrain.warmup_epochs=0",
    "pretrain.checkpoint_every=1",
    "pretrain.knn_k=5",
    "queue_size=48",
    "pretrain.queue_size_adv=32",
]
STEPS = 8
TIMING = ("seconds", "images_per_s")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared", n_train=64)


@pytest.fixture(scope="module")
def runs(params, prepared, tmp_path_factory):
    """(world, distributed.bn) -> the ranks' reports of that pretraining run, made once."""
    made: dict[tuple, list[dict]] = {}

    def get(world: int, bn: str = "sync", *extra: str) -> list[dict]:
        key = (world, bn, *extra)
        if key not in made:
            out = tmp_path_factory.mktemp(f"world{world}-{bn}")
            made[key] = run_pretrain(world, params, SETS + [f"distributed.bn={bn}", *extra], prepared, out)
            made[key][0]["out"] = out
        return made[key]

    return get


# --------------------------------------------------------------------------- pure rules
def test_a_shard_draws_the_numbers_of_the_global_batch():
    def draw(shape):
        return torch.rand(shape, generator=torch.Generator().manual_seed(3))

    whole = draw((10, 3))
    parts = [Shard(rank, 3, 10).sample(draw, (len(rows), 3)) for rank, rows in enumerate(whole.tensor_split(3))]
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(Shard().sample(draw, (10, 3)), whole)  # one process: a plain draw


def test_the_linear_rule_scales_lr_with_the_global_batch_only():
    assert scaled_lr(0.1, 1024, "linear", 256) == pytest.approx(0.4)
    assert scaled_lr(0.1, 1024, "none", 256) == 0.1


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(params, prepared, tmp_path):
    cfg = config.load(params, SETS)
    with pytest.raises(ConfigError, match=r"pretrain.batch_size: the global batch of 16 does not split evenly over 3"):
        Pretraining(cfg, prepared, tmp_path / "out", Dist(rank=0, world=3))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 2 processes
def ring(keys: list[torch.Tensor], size: int) -> tuple[torch.Tensor, int]:
    """The queue (D x size) and pointer after writing the batches `keys` FIFO from 0."""
    stream = torch.cat(keys)  # T x D
    queue = torch.full((stream.shape[1], size), float("nan"))
    for t, key in enumerate(stream):
        queue[:, t % size] = key
    return queue, len(stream) % size


# channels_last, the CUDA default, with shuffle-BN: the images themselves are gathered
# (width 0.25: oneDNN's NHWC kernels crash narrower nets on the CPU, amoc.runtime)
CHANNELS_LAST = ("runtime.channels_last=on", "model.width=0.25")


@pytest.mark.parametrize("bn, extra", [("sync", ()), ("shuffle", ()), ("shuffle", CHANNELS_LAST)])
def test_every_rank_holds_the_same_queues_made_of_the_gathered_keys_in_rank_order(runs, bn, extra):
    rank0, rank1 = runs(2, bn, *extra)
    # ACA+ writes both queues each step: clean keys first, then the adversarial ones.
    assert len(rank0["gathered_keys"]) == 2 * STEPS
    for local0, local1, gathered0, gathered1 in zip(
        rank0["local_keys"], rank1["local_keys"], rank0["gathered_keys"], rank1["gathered_keys"]
    ):
        assert local0.shape[0] == 8  # each rank computes half of the global batch of 16
        assert torch.equal(gathered0, torch.cat([local0, local1]))
        assert torch.equal(gathered1, gathered0)
    for name, size, keys in (("clean", 48, rank0["gathered_keys"][0::2]), ("adv", 32, rank0["gathered_keys"][1::2])):
        queue, ptr = ring(keys, size)
        assert not queue.isnan().any(), "the run should wrap every queue at least once"
        assert torch.equal(rank0["state"][f"queue_{name}"], queue)
        assert torch.equal(rank1["state"][f"queue_{name}"], queue)
        assert int(rank0["state"][f"ptr_{name}"]) == int(rank1["state"][f"ptr_{name}"]) == ptr
    # and the weights of both nets; BN statistics too under sync BN (with shuffle-BN each
    # rank's running statistics come from its own part of the batch, as in MoCo)
    per_rank = ("running_mean", "running_var") if bn == "shuffle" else ()
    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"] if not k.endswith(per_rank))


def test_every_collective_sends_contiguous_tensors_into_outputs_of_the_same_strides(runs):
    """NCCL copies raw bytes: a channels_last tensor sent, or gathered into a channels_last
    output beside a contiguous input, scrambles pixels on a GPU (gloo forgives it). The
    workers route every collective through a shim that asserts contiguity and matching
    strides (distributed_helpers.check_collectives); shuffle-BN gathers the images."""
    for report in runs(2, "shuffle", *CHANNELS_LAST):
        assert report["collectives"]["all_gather"] >= 2 * STEPS  # images and keys, every step
        assert report["collectives"]["broadcast"] > 0


def test_only_rank_0_writes_checkpoints_and_outputs(runs):
    rank0, rank1 = runs(2, "sync")
    assert rank0["saves"] == [(1, 0), (2, 0)] and rank1["saves"] == []
    out = rank0["out"]
    assert sorted(p.name[:23] for p in (out / "rank0" / "checkpoints").iterdir()) == [
        "epoch-0001-step-000000-",
        "epoch-0002-step-000000-",
    ]
    assert {p.name for p in (out / "rank0").iterdir()} == {
        "checkpoints",
        "encoder.pt",
        "metrics.json",
        "summary.json",
        "log.csv",
    }
    assert not (out / "rank1").exists() or not any((out / "rank1").rglob("*"))


def curve(report: dict) -> torch.Tensor:
    """STEPS x 3: the losses this rank's log was given, step by step (its own batch's)."""
    return torch.tensor([[s[k] for k in ("loss", "loss_clean", "loss_adv")] for s in report["losses"]])


def curves(one: dict, *ranks: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One process's per-step losses, and those of the global batch of a run on the `ranks`:
    the mean of the ranks' own (equal shards; the log adds them up when it reads them)."""
    curve1, curve2 = curve(one), torch.stack([curve(r) for r in ranks]).mean(0)
    assert curve1.shape == curve2.shape == (STEPS, 3)
    return curve1, curve2


@pytest.mark.parametrize("method", ["acl", "rocl", "dynacl"])
def test_in_batch_methods_make_the_first_step_of_one_process_with_negatives_from_every_rank(runs, method):
    """ACL, RoCL and DynACL compare each rank's anchors with every rank's embeddings
    (Dist.gather_grad; DynACL's key embeddings without a gradient by a plain gather): the
    first step's losses equal one process's with the same global batch (sync BN, the
    projector's BN1d included, and DynACL's key net outside DDP), and the ranks end with
    equal weights (DynACL's key net and its BN statistics included)."""
    (one,), (rank0, rank1) = runs(1, "sync", f"pretrain.method={method}"), runs(2, "sync", f"pretrain.method={method}")
    curve1, curve2 = curves(one, rank0, rank1)
    torch.testing.assert_close(curve2[0], curve1[0], rtol=1e-5, atol=0)
    state0, state1 = rank0["state"], rank1["state"]
    assert all(torch.equal(state0[k], state1[k]) for k in state0), "the ranks' weights diverged"
    assert rank0["collectives"]["all_reduce"] > 0  # the gathers' backward


def test_rank_0_logs_the_epoch_means_of_the_global_batches(runs):
    """No all-reduce per step for the log: each rank sums its own losses and the sums meet
    at sync points and at the end of an epoch. Rank 0's log.csv holds the epoch means of the
    global batches' losses, as the old per-step all-reduce logged them."""
    ranks = runs(2, "sync")
    _, global_curve = curves(ranks[0], *ranks)
    rows = read_log(ranks[0]["out"] / "rank0" / "log.csv")
    per_epoch = STEPS // len(rows)
    for epoch, row in enumerate(rows):
        want = global_curve[epoch * per_epoch : (epoch + 1) * per_epoch].double().mean(0)
        got = torch.tensor([float(row[k]) for k in ("loss", "loss_clean", "loss_adv")], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_two_ranks_make_the_first_step_of_one_process_with_the_same_global_batch(runs):
    """The first step is the same computation up to float rounding (sync BN, the same
    images, augmentations and attack starts, DDP's average = the global batch's mean), in
    the default (authors') enqueue order."""
    (one,), two = runs(1, "sync"), runs(2, "sync")
    curve1, curve2 = curves(one, *two)
    torch.testing.assert_close(curve2[0], curve1[0], rtol=1e-5, atol=0)


def test_two_ranks_follow_the_loss_curve_of_one_process_with_the_same_global_batch(runs):
    """Afterwards PGD's sign() turns rounding differences into different adversarial
    pixels, and the curves drift apart as far as one process's own curve does when run
    with another thread count (measured on digits: up to 0.43%; one process, 2 threads vs
    1: up to 0.20%; docs/distributed.md). This runs in MoCo's enqueue order: in the
    authors' order each ACA+ query also meets its own near-copy among the negatives, which
    amplifies that noise (one process, 2 threads vs 1, these settings: 0.91% against
    0.001% in MoCo's order; 2 ranks vs 1: 2.6%), so it is no test of the data parallelism."""
    (one,), two = runs(1, "sync", "pretrain.enqueue_order=moco"), runs(2, "sync", "pretrain.enqueue_order=moco")
    curve1, curve2 = curves(one, *two)
    torch.testing.assert_close(curve2[0], curve1[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(curve2, curve1, rtol=2e-2, atol=0)


# --------------------------------------------------------------------------- torchrun
def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "amoc", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_torchrun_pretrain_then_resume_the_checkpoint_in_one_process(params, prepared, tmp_path):
    out = tmp_path / "pretrain"
    argv = ["pretrain", "--params", str(params), "--data", str(prepared), "--out", str(out), *sets(*SETS)]
    done = torchrun(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("amoc pretrain: ACA+, 2 epochs") == 1  # rank 0 reports, once
    assert done.stdout.count("amoc pretrain runtime: cpu, fp32") == 1  # and announces its runtime once
    log2 = read_log(out / "log.csv")
    assert [row["epoch"] for row in log2] == ["1", "2"]

    # Lose epoch 2 and the outputs; the 2-process checkpoint of epoch 1 resumes in 1 process.
    for path in [*(out / "checkpoints").glob("epoch-0002-*"), out / "encoder.pt", out / "metrics.json"]:
        path.unlink()
    assert cli.main(argv + ["--resume"]) == 0
    log1 = read_log(out / "log.csv")
    assert log1[0] == log2[0]  # restored from the checkpoint, not recomputed
    assert float(log1[1]["loss"]) == pytest.approx(float(log2[1]["loss"]), rel=2e-2)
    assert (out / "encoder.pt").exists()


def test_torchrun_finetune_matches_one_process(params, prepared, tmp_path):
    pre = tmp_path / "pretrain"
    assert (
        cli.main(
            [
                "pretrain",
                "--params",
                str(params),
                "--data",
                str(prepared),
                "--out",
                str(pre),
                *sets(*SETS, "pretrain.epochs=1"),
            ]
        )
        == 0
    )
    argv = [
        "finetune",
        "--params",
        str(params),
        "--init",
        str(pre / "encoder.pt"),
        "--data",
        str(prepared),
        # No PGD steps: its sign() would turn rounding into different pixels (see the
        # pretraining curve test); TRADES still draws its start noise for the global batch.
        *sets("runtime.device=cpu", "finetune.batch_size=16", "finetune.epochs=2", "finetune.attack.steps=0"),
    ]
    assert cli.main(argv + ["--out", str(tmp_path / "one")]) == 0
    done = torchrun(*argv, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = read_log(tmp_path / "one" / "log.csv"), read_log(tmp_path / "two" / "log.csv")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):  # sync BN through the whole encoder, DDP over the classifier
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-4)
        assert b["train_acc"] == a["train_acc"]
    assert len(list((tmp_path / "two" / "checkpoints").iterdir())) == 2


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_then_resumes(params, prepared, tmp_path):
    out = tmp_path / "pretrain"
    argv = [
        "pretrain",
        "--params",
        str(params),
        "--data",
        str(prepared),
        "--out",
        str(out),
        *sets(*SETS, "pretrain.epochs=12"),
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "amoc", *argv]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob("epoch-0001-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    stops = re.findall(
        r"amoc pretrain: error: SIGTERM received: stopped at epoch (\d+), step (\d+); checkpoint (\S+)\.", stderr
    )
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]  # both ranks, the same step and file
    epoch, step, path = stops[0]
    assert int(epoch) < 12 and Path(path).exists() and not (out / "encoder.pt").exists()

    assert cli.main(argv + ["--resume"]) == 0  # carries on in one process
    assert [row["epoch"] for row in read_log(out / "log.csv")] == [str(e) for e in range(1, 13)]
