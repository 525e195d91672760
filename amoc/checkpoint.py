"""Resumable training state: atomic epoch checkpoints with fallback to the previous
good one, tagged with a fingerprint of the config that produced them."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import torch

from amoc.errors import CheckpointError
from amoc.io import torch_load, torch_save

_NAME = re.compile(r"^epoch-(\d{4,})-step-(\d{6,})-([0-9a-f]+)\.pt$")


def fingerprint(*parts: Any) -> str:
    """A stable digest of plain data (config sections, paths) that a resume must match."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """The random state a resume restores: the global CPU and Python generators and the
    run's own `generators` (on the run's device). No global CUDA state: nothing in a run
    draws from it (every device draw takes a run generator), and a state per visible GPU
    could not be restored on a machine with fewer GPUs (8 -> 4 -> 1, docs/distributed.md)."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict[str, Any], *generators: torch.Generator) -> None:
    """Restore `rng_state`. A "cuda" entry (checkpoints written before 2026-12-04 held one
    per visible GPU) is ignored, for the reason `rng_state` gives."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    for g, s in zip(generators, state["generators"]):
        try:
            g.set_state(s)
        except RuntimeError:  # a generator state of another device type: sizes differ
            raise CheckpointError(
                f"the checkpoint's random state does not fit this run's {g.device.type} generator (written on "
                "another device type?); run the stage without --resume to start fresh"
            ) from None


def _as_tuple(obj: Any) -> Any:
    return tuple(_as_tuple(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


class CheckpointManager:
    """`folder/epoch-EEEE-step-SSSSSS-<fingerprint>.pt`, the newest `keep` of this
    config kept; (epoch, step) must increase over a run (step 0 = an epoch boundary).

    The fingerprint in the name keeps runs of different configs apart (a pipeline
    stage whose params changed starts fresh and deletes the stale files on its first
    save). `load_latest` skips, and reports, corrupt files, falling back to older ones."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.keep = keep

    def _all(self) -> list[tuple[tuple[int, int], str, Path]]:
        if not self.folder.is_dir():
            return []
        found = [
            ((int(m.group(1)), int(m.group(2))), m.group(3), p)
            for p in self.folder.iterdir()
            if (m := _NAME.match(p.name))
        ]
        return sorted(found, key=lambda t: t[0], reverse=True)

    def foreign(self) -> int:
        """How many checkpoints in the folder another config (or device type) wrote."""
        return sum(fp != self.fingerprint for _, fp, _ in self._all())

    def paths(self) -> list[Path]:
        """This config's checkpoints, newest first."""
        return [p for _, fp, p in self._all() if fp == self.fingerprint]

    def path(self, epoch: int, step: int = 0) -> Path:
        """Where `save(epoch, ..., step)` writes (other ranks name the file rank 0 writes)."""
        return self.folder / f"epoch-{epoch:04d}-step-{step:06d}-{self.fingerprint}.pt"

    def save(self, epoch: int, state: dict[str, Any], step: int = 0) -> Path:
        """`step` > 0 marks a mid-epoch checkpoint (a stop signal arrived)."""
        path = self.path(epoch, step)
        torch_save(path, {"fingerprint": self.fingerprint, "epoch": epoch, "step": step, **state})
        for _, fp, old in self._all():
            if fp != self.fingerprint:
                old.unlink(missing_ok=True)
        for old in self.paths()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> dict[str, Any] | None:
        for path in self.paths():
            try:
                blob = torch_load(path)
            except CheckpointError as exc:
                print(f"warning: {exc}; falling back to an older checkpoint", file=sys.stderr)
                continue
            if not isinstance(blob, dict) or blob.get("fingerprint") != self.fingerprint:
                print(f"warning: {path}: not a checkpoint of this config; skipping it", file=sys.stderr)
                continue
            return blob
        return None

    def clear(self) -> None:
        for _, _, path in self._all():
            path.unlink(missing_ok=True)
