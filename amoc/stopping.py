"""Clean stops: SIGINT/SIGTERM finish the current step, write a checkpoint, exit;
non-finite losses or weights stop the run with a message naming where."""

from __future__ import annotations

import math
import signal
import types
from typing import Any

import torch

from amoc.errors import AmocError, NumericalError


class Stopped(AmocError):
    """The run was asked to stop and saved a checkpoint; `--resume` continues it."""

    exit_code = 130


class StopSignals:
    """While active, SIGINT/SIGTERM set `requested` instead of killing the process."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.requested:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_finite(losses: dict[str, torch.Tensor], *, epoch: int, step: int) -> None:
    """One host sync for all losses; call it every few steps, not every step."""
    values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    if not bool(torch.isfinite(values).all()):
        bad = [name for name, v in zip(losses, values.tolist()) if not math.isfinite(v)]
        raise NumericalError(
            f"non-finite {', '.join(bad)} at epoch {epoch}, step {step}; the last good checkpoint is kept - "
            "lower the learning rate or use --set runtime.precision=fp32"
        )


def check_finite_params(module: torch.nn.Module, *, epoch: int) -> None:
    flat = [p.detach().float().abs().sum() for p in module.parameters()]
    if flat and not bool(torch.isfinite(torch.stack(flat).sum())):
        raise NumericalError(
            f"non-finite weights after epoch {epoch}; the last good checkpoint is kept - lower the learning rate"
        )
