"""Bookkeeping of the pre-training loop: per-epoch rows (log.csv).

Losses are summed on the device, step after step, and read back only every few steps
(`running`, `check_finite`) and at the end of an epoch, so the loop never waits for
the device. In a data-parallel run each rank sums its own losses, divided by the
number of ranks, and the sums are added over the ranks (one all-reduce) only when they
are read: every rank reads at the same sync points, and the epoch's means are those of
the global batches, as one process would log them, without a collective per step.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from amoc.distributed import Dist
from amoc.io import write_text
from amoc.stopping import check_finite

COLUMNS = ("epoch", "loss", "loss_clean", "loss_adv", "lr", "images_per_s", "seconds", "knn_acc")
LOSSES = ("loss", "loss_clean", "loss_adv")


class EpochLog:
    """Running sums of the current epoch plus one row per finished epoch. `dist`: a
    data-parallel run; every rank then calls `running`, `check_finite`, `end_epoch` and
    `state` at the same points (each is one all-reduce)."""

    def __init__(self, path: str | Path | None, *, has_adv_loss: bool, dist: Dist = Dist()) -> None:
        self.path = None if path is None else Path(path)  # None: keep the rows, write nothing (ranks > 0)
        self.has_adv_loss = has_adv_loss
        self.dist = dist
        self.rows: list[dict[str, Any]] = []
        # 3 losses summed over the epoch's steps: this rank's losses / world (rank 0 also
        # carries a resumed epoch's global sums); their sum over the ranks is the global one
        self.sums: torch.Tensor | None = None
        self.count = 0
        self.lr = 0.0

    def add(self, losses: dict[str, torch.Tensor], lr: float) -> None:
        """This rank's mean losses of one step (detached, on the device): no collective."""
        step = torch.stack(
            [losses["loss"], losses["loss_clean"], losses.get("loss_adv", torch.zeros_like(losses["loss"]))]
        )
        if self.dist.active:  # the global batch's mean is the mean of the ranks' means (equal shards)
            step = step / self.dist.world
        if self.sums is None:
            self.sums = step
        else:
            self.sums.add_(step)
        self.count += 1
        self.lr = lr

    def global_sums(self) -> torch.Tensor | None:
        """The epoch's loss sums over every rank (an all-reduce in a data-parallel run)."""
        return None if self.sums is None else self.dist.sum(self.sums)

    def running(self) -> dict[str, float]:
        """Mean losses of the epoch so far (one host sync)."""
        sums = self.global_sums()
        if sums is None:
            return {}
        means = (sums / self.count).tolist()
        return {name: value for name, value in zip(LOSSES, means) if name != "loss_adv" or self.has_adv_loss}

    def check_finite(self, *, epoch: int, step: int) -> None:
        """NumericalError if any loss since the start of the epoch was NaN or inf."""
        sums = self.global_sums()
        if sums is not None:
            check_finite(dict(zip(LOSSES, sums)), epoch=epoch + 1, step=step)

    def end_epoch(self, epoch: int, *, images: int, seconds: float, knn_acc: float | None) -> dict[str, Any]:
        """Close the epoch's row (epoch counted from 1) and rewrite log.csv."""
        means = self.running()
        row = {
            "epoch": epoch,
            "loss": means.get("loss"),
            "loss_clean": means.get("loss_clean"),
            "loss_adv": means.get("loss_adv"),
            "lr": self.lr,
            "images_per_s": images / max(seconds, 1e-9),
            "seconds": seconds,
            "knn_acc": knn_acc,
        }
        self.rows.append(row)
        self.sums, self.count = None, 0
        self.write()
        return row

    def write(self) -> None:
        if self.path is None:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
        write_text(self.path, buf.getvalue())

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """The checkpoint's part, with the global sums (on every rank, which all call it)."""
        sums = self.global_sums()
        return {
            "rows": [dict(r) for r in self.rows],
            "count": self.count,
            "lr": self.lr,
            "sums": None if sums is None else sums.detach().cpu(),
        }

    def load_state(self, state: dict[str, Any], device: torch.device) -> None:
        """Every rank loads the same checkpoint; rank 0 carries its global sums on."""
        self.rows = [dict(r) for r in state["rows"]]
        self.count, self.lr = state["count"], state["lr"]
        sums = None if state["sums"] is None else state["sums"].to(device)
        self.sums = sums if sums is None or self.dist.main else torch.zeros_like(sums)
