"""The shared resumable loop, on a toy job: position, checkpoints, stop signals, resume."""

from __future__ import annotations

import os
import signal

import pytest

from amoc.checkpoint import CheckpointManager
from amoc.stopping import Stopped
from amoc.training.loop import Job, Loop


class Counter(Job):
    """Adds step numbers; `stop_after` sends SIGINT to itself after that many steps."""

    desc, batch_key, batch_size = "toy", "toy.batch_size", 1

    def __init__(self, epochs: int = 3, steps: int = 4, sync_every: int = 2, every: int = 1, stop_after: int = 0):
        self.epochs, self.steps, self.sync_every, self.every, self.stop_after = (
            epochs,
            steps,
            sync_every,
            every,
            stop_after,
        )
        self.total, self.calls, self.rows, self.synced, self.fresh_calls = 0, 0, [], [], 0

    def steps_in_epoch(self) -> int:
        return self.steps

    def begin_epoch(self, epoch: int, step: int) -> None:
        self.begun = (epoch, step)

    def train_step(self, epoch: int, step: int) -> None:
        self.total += 100 * epoch + step
        self.calls += 1
        if self.calls == self.stop_after:
            os.kill(os.getpid(), signal.SIGINT)

    def sync(self, epoch: int, step: int) -> dict[str, str]:
        self.synced.append((epoch, step))
        return {"total": str(self.total)}

    def end_epoch(self, epoch: int, seconds: float) -> bool:
        self.rows.append((epoch, self.total, seconds >= 0))
        return (epoch + 1) % self.every == 0

    def state(self) -> dict:
        return {"total": self.total, "rows": list(self.rows)}

    def load_state(self, blob: dict) -> None:
        self.total, self.rows = blob["total"], list(blob["rows"])

    def fresh(self) -> None:
        self.fresh_calls += 1


def run(job: Counter, folder, resume: bool = False) -> CheckpointManager:
    ckpts = CheckpointManager(folder, "abc")
    Loop(job, ckpts, progress=False).run(resume)
    return ckpts


def test_runs_every_step_once_syncs_and_checkpoints(tmp_path):
    job = Counter(every=2)
    ckpts = run(job, tmp_path)
    assert job.total == sum(100 * e + s for e in range(3) for s in range(4))
    assert job.synced == [(e, s) for e in range(3) for s in (2, 4)]
    assert [r[0] for r in job.rows] == [0, 1, 2] and job.fresh_calls == 1
    # a checkpoint only where end_epoch asks for one: after epoch 2 of 3
    assert [p.name[:22] for p in ckpts.paths()] == ["epoch-0002-step-000000"]


@pytest.mark.parametrize("stop_after,position", [(6, (1, 2)), (8, (2, 0))], ids=["mid-epoch", "end-of-epoch"])
def test_a_stop_signal_saves_the_position_and_resume_finishes_identically(tmp_path, capsys, stop_after, position):
    reference = Counter()
    run(reference, tmp_path / "ref")
    job = Counter(stop_after=stop_after)
    with pytest.raises(Stopped, match="SIGINT received: stopped at epoch") as stop:
        run(job, tmp_path / "run")
    ckpts = CheckpointManager(tmp_path / "run", "abc")
    blob = ckpts.load_latest()
    assert (blob["epoch"], blob["step"]) == position
    assert str(ckpts.paths()[0]) in str(stop.value) and "--resume" in str(stop.value)
    resumed = Counter()
    run(resumed, tmp_path / "run", resume=True)
    assert resumed.begun == (2, 0) and resumed.total == reference.total and resumed.rows == reference.rows
    assert "toy: resuming at epoch" in capsys.readouterr().err and resumed.fresh_calls == 0


def test_resume_without_a_checkpoint_starts_fresh_and_clears_other_configs(tmp_path, capsys):
    other = CheckpointManager(tmp_path, "other")
    other.save(1, {"seconds": 0.0})
    job = Counter(epochs=1)
    run(job, tmp_path, resume=True)
    assert "no usable checkpoint" in capsys.readouterr().err and job.fresh_calls == 1
    assert other.paths() == [] and job.calls == 4
