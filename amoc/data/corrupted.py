"""The corrupted test set on disk: the CIFAR-10-C layout, plus a provenance file.

    <dir>/<corruption>.npy  uint8, (S * N) x H x W x 3: S severity blocks of N images,
                            in the order of `severities` (1..5 for the official sets)
    <dir>/labels.npy        (S * N,) labels of the same rows (uint8, or int64 if > 255)
    <dir>/source.json       kind ("generated-approximation" | "official" | "custom-archive"),
                            note, names, severities, n_images, seed, ...

`amoc corruptions` writes it (source.json last: its presence marks a complete set) and
`amoc evaluate --corruptions` reads it. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from amoc.config import CORRUPTIONS
from amoc.errors import DataError
from amoc.io import write_json, write_with

SOURCE_JSON = "source.json"
LABELS = "labels.npy"
KINDS = ("generated-approximation", "official", "custom-archive")
OUTPUTS = (SOURCE_JSON, LABELS) + tuple(f"{name}.npy" for name in CORRUPTIONS)


def write_array(folder: Path, name: str, array: np.ndarray) -> None:
    """Atomic np.save (through a file object: np.save appends .npy to a bare temp path)."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)

    write_with(folder / f"{name}.npy", save)


def write_labels(folder: Path, labels: np.ndarray) -> None:
    labels = np.asarray(labels)
    small = len(labels) == 0 or (labels.min() >= 0 and labels.max() <= 255)
    write_array(folder, "labels", labels.astype(np.uint8 if small else np.int64))


def write_source(folder: Path, info: dict[str, Any]) -> None:
    assert info.get("kind") in KINDS, info.get("kind")
    write_json(folder / SOURCE_JSON, info)


@dataclass(frozen=True)
class CorruptedSet:
    folder: Path
    info: dict[str, Any]
    names: list[str]
    severities: list[int]
    n_images: int
    labels: np.ndarray  # S * N, int64

    @property
    def kind(self) -> str:
        return str(self.info["kind"])

    def block(self, severity: int) -> slice:
        i = self.severities.index(severity)
        return slice(i * self.n_images, (i + 1) * self.n_images)

    def images(self, name: str, severity: int) -> np.ndarray:
        """N x H x W x 3 uint8 of one corruption and severity (a view of a memory map)."""
        return _load(self.folder / f"{name}.npy", mmap=True)[self.block(severity)]

    def severity_labels(self, severity: int) -> np.ndarray:
        return self.labels[self.block(severity)]


def _load(path: Path, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing from the corrupted set; rerun `amoc corruptions --out {path.parent}`")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(
            f"{path}: unreadable ({type(exc).__name__}); rerun `amoc corruptions --out {path.parent}`"
        ) from None


def read(folder: str | os.PathLike) -> CorruptedSet:
    """Open and check a corrupted set; DataError names the first problem."""
    folder = Path(folder)
    meta = folder / SOURCE_JSON
    if not meta.is_file():
        raise DataError(
            f"{meta}: not found; {folder} is not a complete corrupted set, run `amoc corruptions --out {folder}` first"
        )
    try:
        info = json.loads(meta.read_text())
        names, severities, n = list(info["names"]), [int(s) for s in info["severities"]], int(info["n_images"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{meta}: unreadable or incomplete; rerun `amoc corruptions --out {folder}`") from None
    if info.get("kind") not in KINDS or not names or not severities or n <= 0:
        raise DataError(f"{meta}: kind, names, severities or n_images invalid; rerun `amoc corruptions --out {folder}`")
    rows = len(severities) * n
    labels = _load(folder / LABELS)
    if labels.shape != (rows,) or labels.dtype.kind not in "iu":
        raise DataError(f"{folder / LABELS}: expected {rows} integer labels, got {labels.dtype} {labels.shape}")
    for name in names:
        arr = _load(folder / f"{name}.npy", mmap=True)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] != rows or arr.shape[3] != 3:
            raise DataError(
                f"{folder / name}.npy: expected uint8 {rows} x H x W x 3, got {arr.dtype} {arr.shape}; "
                "rerun `amoc corruptions`"
            )
    return CorruptedSet(folder, info, names, severities, n, labels.astype(np.int64))
