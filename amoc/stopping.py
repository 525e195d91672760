"""Clean stops: SIGINT/SIGTERM finish the current step, write a checkpoint, exit;
non-finite losses or weights stop the run with a message naming where."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import types
from typing import Any

import torch

from amoc.errors import AmocError, NumericalError

_PARENT = os.getppid()  # the process that started this one, read at import
_SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "fish", "busybox"}
_watching = False


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:  # "pid (comm) state ppid ..."; comm may hold spaces
            stat = fh.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def stop_with_parent() -> None:
    """Under DVC (it sets DVC_STAGE for a stage's command), stop like on SIGTERM when DVC
    dies. DVC does not pass a SIGTERM it receives on to the stage, which trained on as an
    orphan that nobody records (and whose lock made the next `dvc repro` wait). A daemon
    thread checks once a second that the chain from this process up to the engine (DVC,
    through the shell that runs the command, if that shell did not exec) is unbroken: a
    process that exits hands its children to another parent at once. Not for a command
    started by hand: `nohup amoc pretrain ... &` must outlive its shell. Linux only."""
    global _watching
    if _watching or "DVC_STAGE" not in os.environ or not sys.platform.startswith("linux"):
        return
    chain = [os.getpid()]  # this process, then its ancestors up to the first that is not a shell
    while len(chain) < 4:
        parent = _ppid(chain[-1])
        if parent is None or parent <= 1:
            break
        chain.append(parent)
        if _comm(parent) not in _SHELLS:
            break
    if os.getppid() != _PARENT:  # the parent died already
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if len(chain) < 2:  # no /proc, or the engine is init itself (a container's entry point)
        return
    links = list(zip(chain, chain[1:]))

    def watch() -> None:
        while all(_ppid(child) == parent for child, parent in links):
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    _watching = True
    threading.Thread(target=watch, name="amoc-parent-watch", daemon=True).start()


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
        if self._old:
            stop_with_parent()
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
