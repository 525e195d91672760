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
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], *generators: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
