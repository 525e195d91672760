"""The data stage's output format, read by every later stage.

A prepared folder holds `train.npz` and `test.npz` (arrays `x`: N x 3 x H x W uint8,
`y`: N int64) and `stats.json` (class names, counts per split and class, and the
per-channel mean/std that the model's input normalisation uses).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amoc.errors import DataError
from amoc.io import remake_hint

SPLITS = ("train", "test")
# The spec's CIFAR-10 normalisation, recorded in stats.json for cifar10 whatever the subset.
CIFAR10_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR10_STD = (0.2471, 0.2435, 0.2617)


def split_path(folder: str | os.PathLike, split: str) -> Path:
    return Path(folder) / f"{split}.npz"


def load_split(folder: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 3 x H x W, labels int64 N) of one split, on the CPU."""
    path = split_path(folder, split)
    if not path.is_file():
        raise DataError(f"{path}: prepared data not found; run `amoc download --out {Path(folder)}` first")
    try:
        with np.load(path, allow_pickle=False) as blob:
            x, y = blob["x"], blob["y"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: unreadable prepared data ({type(exc).__name__}); {remake_hint(path)}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3 or y.shape != (x.shape[0],):
        raise DataError(
            f"{path}: expected x uint8 N x 3 x H x W and y of length N, got x {x.dtype} {x.shape}, y {y.shape}; "
            f"{remake_hint(path)}"
        )
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def load_stats(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / "stats.json"
    if not path.is_file():
        raise DataError(f"{path}: dataset stats not found; run `amoc download --out {Path(folder)}` first")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable stats ({type(exc).__name__}); {remake_hint(path)}") from None
