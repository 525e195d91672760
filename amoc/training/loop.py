"""The resumable epoch loop behind every training stage (`amoc pretrain`, `amoc probe`,
`amoc finetune`).

The loop owns what all of them share: the position (epoch, step), resuming from the
newest good checkpoint of the same config (or clearing what an earlier run left), the
stop signals (SIGINT/SIGTERM finish the current step, write a checkpoint, raise
`Stopped`), host syncs every few steps, a progress bar, the epoch's training time and
out-of-memory hints. A stage supplies a `Job`: what one step, one sync and the end of an
epoch do, and the state a checkpoint holds besides the position.

Data-parallel runs (amoc.distributed): every rank runs the loop; stop signals are agreed
at sync points, so all ranks stop after the same step; `Job.state()` runs on every rank
(it may use collectives) and rank 0 writes the file.
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from typing import Any

from tqdm import tqdm

from amoc.checkpoint import CheckpointManager
from amoc.distributed import Dist
from amoc.errors import AmocError
from amoc.runtime import oom_hint
from amoc.stopping import Stopped, StopSignals


class Job(ABC):
    """One training run as the loop sees it. Epochs and steps count from 0 here;
    messages and log rows count from 1."""

    desc: str  # the progress bar's label and the prefix of every message ("amoc pretrain", "probe slf")
    epochs: int
    sync_every: int  # steps between host syncs (NaN check, progress, agreeing on a stop)
    batch_key: str  # the param that sizes the batch, for out-of-memory hints ("pretrain.batch_size")
    batch_size: int

    @abstractmethod
    def steps_in_epoch(self) -> int:
        """Optimisation steps per epoch (the same for every epoch)."""

    @abstractmethod
    def begin_epoch(self, epoch: int, step: int) -> None:
        """Prepare `epoch`, which starts at `step` (> 0 when resumed mid-epoch)."""

    @abstractmethod
    def train_step(self, epoch: int, step: int) -> None:
        """One optimisation step; no host sync."""

    @abstractmethod
    def sync(self, epoch: int, step: int) -> dict[str, str]:
        """A host sync after `step` steps of `epoch`: raise on non-finite losses; return
        the progress bar's figures."""

    @abstractmethod
    def end_epoch(self, epoch: int, seconds: float) -> bool:
        """Close `epoch` (its log row; `seconds` of training). True: checkpoint now."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the position; runs on every rank."""

    @abstractmethod
    def load_state(self, blob: dict[str, Any]) -> None:
        """Restore `state()` from a checkpoint blob."""

    def fresh(self) -> None:
        """Rank 0, on a fresh start: delete what an earlier run left besides checkpoints."""

    def started(self) -> None:
        """After the start or resume, on every rank (e.g. broadcast rank 0's weights)."""


class Loop:
    """Runs a Job from its newest checkpoint (with `resume`) to its last epoch."""

    def __init__(self, job: Job, checkpoints: CheckpointManager, dist: Dist = Dist(), *, progress: bool = True) -> None:
        self.job, self.checkpoints, self.dist = job, checkpoints, dist
        self.progress = progress and dist.main
        self.epoch, self.step = 0, 0  # position: the next step to run
        self.seconds = 0.0  # training time of the current epoch so far

    def run(self, resume: bool = False) -> None:
        try:
            self._run(resume)
        except RuntimeError as exc:
            if not self.dist.lost_peer(exc):
                raise
            kept = self.checkpoints.paths()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise AmocError(
                f"rank {self.dist.rank} lost another rank at epoch {self.epoch + 1}, step {self.step} ({first}); "
                + (f"the last checkpoint {kept[0]} is kept" if kept else "no checkpoint was written yet")
                + ". Rerun with --resume (under `torchrun --max-restarts=N` the restart does it)"
            ) from None

    def _run(self, resume: bool) -> None:
        job = self.job
        self._open(resume)
        steps = job.steps_in_epoch()
        bar = tqdm(
            total=job.epochs * steps,
            initial=self.epoch * steps + self.step,
            unit="step",
            desc=job.desc,
            disable=not self.progress,
            dynamic_ncols=True,
            leave=False,
        )
        with StopSignals() as signals, bar, oom_hint(job.desc, job.batch_key, job.batch_size):
            while self.epoch < job.epochs:
                job.begin_epoch(self.epoch, self.step)
                tick = time.perf_counter()
                while self.step < steps:
                    job.train_step(self.epoch, self.step)
                    self.step += 1
                    bar.update(1)
                    synced = self.step % job.sync_every == 0 or self.step == steps
                    if synced:
                        bar.set_postfix(job.sync(self.epoch, self.step), refresh=False)
                    if self.dist.should_stop(bool(signals.requested), synced) and self.step < steps:
                        self.seconds += time.perf_counter() - tick
                        self._stop(signals)  # mid-epoch
                self.seconds += time.perf_counter() - tick
                finished, seconds = self.epoch, self.seconds
                self.epoch, self.step, self.seconds = self.epoch + 1, 0, 0.0
                save = job.end_epoch(finished, seconds)
                stop = self.epoch < job.epochs and self.dist.should_stop(bool(signals.requested), True)
                if save or stop:
                    path = self._save()
                if stop:
                    self._stop(signals, path, at=(finished + 1, steps))

    # ------------------------------------------------------------------ checkpoints
    def _save(self):
        """A checkpoint at the current position; every rank builds the state, rank 0 writes."""
        blob = {**self.job.state(), "seconds": self.seconds}
        if not self.dist.main:
            return self.checkpoints.path(self.epoch, self.step)
        return self.checkpoints.save(self.epoch, blob, step=self.step)

    def _stop(self, signals: StopSignals, path=None, at: tuple[int, int] | None = None) -> None:
        path = self._save() if path is None else path
        epoch, step = at or (self.epoch + 1, self.step)
        raise Stopped(
            f"{signals.requested or 'a stop signal'} received: stopped at epoch {epoch}, step {step}; "
            f"checkpoint {path}. Continue with the same command plus --resume"
        )

    def _open(self, resume: bool) -> None:
        blob = self.checkpoints.load_latest() if resume else None
        if blob is None and self.dist.main:
            if resume:
                foreign = self.checkpoints.foreign()
                why = (
                    f" (its {foreign} checkpoint{'s' if foreign != 1 else ''} came from other params, data, "
                    "precision or device type)"
                    if foreign
                    else ""
                )
                print(
                    f"{self.job.desc}: note: no usable checkpoint in {self.checkpoints.folder}{why}; starting fresh",
                    file=sys.stderr,
                )
            # a fresh run drops what an earlier run left, so a later --resume or a reader never mixes the two
            self.checkpoints.clear()
            self.job.fresh()
        self.dist.barrier()  # no rank reads while rank 0 clears
        if blob is not None:
            self.job.load_state(blob)
            self.epoch, self.step = int(blob["epoch"]), int(blob["step"])
            self.seconds = float(blob.get("seconds") or 0.0)  # older checkpoints kept it elsewhere
            if self.dist.main:
                print(
                    f"{self.job.desc}: resuming at epoch {self.epoch + 1}, step {self.step} from "
                    f"{self.checkpoints.folder}",
                    file=sys.stderr,
                )
        self.job.started()
