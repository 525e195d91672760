"""Batched per-image correctness of a classifier, clean or under an attack: the one
counting loop behind `amoc evaluate` (clean, PGD, AutoAttack, corruptions) and
`amoc transfer`."""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from amoc.errors import DataError
from amoc.runtime import Runtime

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images in [0, 1], labels) -> images


def correct(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    rt: Runtime,
    batch_size: int,
    attack: Attack | None = None,
    *,
    layout: Literal["NCHW", "NHWC"] = "NCHW",
    desc: str | None = None,
) -> torch.Tensor:
    """Whether model(attack(x)) predicts each label (bool N, on rt.device), in batches.

    `images`: uint8 (scaled to [0, 1]) or float in [0, 1], a tensor or a numpy array (read-only
    memory maps too), N x 3 x H x W or, with layout="NHWC", N x H x W x 3. `desc` shows a
    progress bar (when rt.progress). A label the model cannot predict is a DataError: the
    classifier was trained on another data set."""
    out = []
    # the largest label, read once here rather than from the device after every batch
    top = int(labels.max()) if len(labels) else -1  # device-ok: once per call, before the loop
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None or not rt.progress, leave=False):
        xb = _tensor(images[start : start + batch_size]).to(rt.device)
        yb = _tensor(labels[start : start + batch_size]).to(rt.device).long()
        if layout == "NHWC":
            xb = xb.permute(0, 3, 1, 2)
        xb = rt.images(xb.float().div_(255) if xb.dtype == torch.uint8 else xb)
        if attack is not None:
            xb = attack(xb, yb)
        with torch.no_grad():
            logits = model(xb)
        if logits.shape[1] <= top:
            raise DataError(
                f"the classifier predicts {logits.shape[1]} classes but a label is {top}; "
                "evaluate on the data set it was trained on"
            )
        out.append(logits.argmax(1) == yb)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=rt.device)


def percent(mask: torch.Tensor) -> float:
    """Accuracy in % of a correctness mask (0 for no images)."""
    return 100.0 * float(mask.float().mean()) if len(mask) else 0.0  # device-ok: the result, read once


def _tensor(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))  # a writable copy
