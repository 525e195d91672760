"""The pre-training log in a data-parallel run: each rank sums its own losses and the sums
meet (one all-reduce) only when they are read, at sync points and the end of an epoch. The
epoch means are those of the old scheme, which averaged every step's losses over the ranks
(one all-reduce per step). Two ranks run as threads over an in-memory all-reduce."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from amoc.distributed import Dist
from amoc.pretrain.log import EpochLog


class Bus:
    """An in-memory all-reduce (sum) for `world` threads; counts the collectives."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = 0

    def all_reduce(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for other in self.slots[1:]:  # the same order on every rank: the same result
            total += other
        if rank == 0:
            self.calls += 1
        self.barrier.wait()
        return total


@dataclass(frozen=True)
class ThreadDist(Dist):
    bus: Any = field(default=None, compare=False)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.bus.all_reduce(self.rank, t)


EPOCHS, STEPS, SYNC_EVERY, WORLD = 2, 7, 3, 2


def local_losses(rank: int) -> list[dict[str, torch.Tensor]]:
    """Each rank's mean losses of every step (float32 on the device, as TrainStep returns)."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(EPOCHS * STEPS):
        clean, adv = 4 + torch.rand((), generator=g), 5 + torch.rand((), generator=g)
        out.append({"loss": 0.5 * clean + 0.5 * adv, "loss_clean": clean, "loss_adv": adv})
    return out


def run_rank(log: EpochLog, losses: list[dict], start: int = 0, stop_at: int | None = None, out: dict | None = None):
    """The loop's calls: add every step, check_finite + running at sync points, end_epoch;
    `stop_at` (a global step) saves the state there and returns."""
    for i in range(start, EPOCHS * STEPS):
        epoch, step = divmod(i, STEPS)
        log.add(losses[i], lr=0.1)
        if (step + 1) % SYNC_EVERY == 0 or step + 1 == STEPS:
            log.check_finite(epoch=epoch, step=step + 1)
            log.running()
        if step + 1 == STEPS:
            log.end_epoch(epoch + 1, images=1, seconds=1.0, knn_acc=None)
        if stop_at is not None and i + 1 == stop_at:
            out["state"] = log.state()
            return


def run_ranks(target, *per_rank_args) -> None:
    errors: list[BaseException] = []

    def guarded(*args):
        try:
            target(*args)
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=args) for args in per_rank_args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def reference_rows() -> list[dict]:
    """The old scheme: every step's losses averaged over the ranks, then logged."""
    ranks = [local_losses(r) for r in range(WORLD)]
    log = EpochLog(None, has_adv_loss=True)
    mean = [{k: (ranks[0][i][k] + ranks[1][i][k]) / WORLD for k in ranks[0][i]} for i in range(EPOCHS * STEPS)]
    run_rank(log, mean)
    return log.rows


def compare(rows: list[dict], ref: list[dict]) -> None:
    assert len(rows) == len(ref) == EPOCHS
    for row, want in zip(rows, ref):
        for key in ("loss", "loss_clean", "loss_adv"):
            assert row[key] == pytest.approx(want[key], rel=1e-6, abs=0)


def test_two_ranks_log_the_epoch_means_of_the_per_step_reduction_with_a_collective_per_read():
    bus = Bus(WORLD)
    logs = [EpochLog(None, has_adv_loss=True, dist=ThreadDist(r, WORLD, r, bus)) for r in range(WORLD)]
    run_ranks(run_rank, *[(logs[r], local_losses(r)) for r in range(WORLD)])
    ref = reference_rows()
    compare(logs[0].rows, ref)
    assert logs[0].rows == logs[1].rows  # every rank logs the same numbers
    # collectives: check_finite + running at each sync point, running at the end of an epoch;
    # none per step (the old scheme made EPOCHS * STEPS of them besides)
    syncs = len([s for s in range(1, STEPS + 1) if s % SYNC_EVERY == 0 or s == STEPS])
    assert bus.calls == EPOCHS * (2 * syncs + 1)


def test_a_resumed_two_rank_log_carries_the_global_sums_on_rank_0_only():
    """State saved mid-epoch 2 (all ranks call state(): one all-reduce), loaded by every
    rank from rank 0's checkpoint, then the rest of the run: the rows of an unbroken run."""
    stop = STEPS + 4
    bus = Bus(WORLD)
    logs = [EpochLog(None, has_adv_loss=True, dist=ThreadDist(r, WORLD, r, bus)) for r in range(WORLD)]
    saved = [{} for _ in range(WORLD)]
    run_ranks(run_rank, *[(logs[r], local_losses(r), 0, stop, saved[r]) for r in range(WORLD)])
    assert torch.equal(saved[0]["state"]["sums"], saved[1]["state"]["sums"])  # global on every rank
    resumed = [EpochLog(None, has_adv_loss=True, dist=ThreadDist(r, WORLD, r, bus)) for r in range(WORLD)]
    for log in resumed:
        log.load_state(saved[0]["state"], torch.device("cpu"))
    run_ranks(run_rank, *[(resumed[r], local_losses(r), stop) for r in range(WORLD)])
    compare(resumed[0].rows, reference_rows())
    assert resumed[0].rows == resumed[1].rows


def test_one_process_sums_exactly_as_before():
    """No rank division or collective in a single process: the sums are the plain sums."""
    log = EpochLog(None, has_adv_loss=True)
    losses = local_losses(0)
    for step in losses[:STEPS]:
        log.add(step, lr=0.1)
    want = losses[0]["loss_clean"].clone()
    for step in losses[1:STEPS]:
        want += step["loss_clean"]
    assert torch.equal(log.sums[1], want)
