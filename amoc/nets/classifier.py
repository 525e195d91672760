"""The downstream classifier (encoder + linear head) and its on-disk format.

`amoc probe` and `amoc finetune` write it, `amoc evaluate` reads it, and so can anyone:
`amoc.load_classifier(path)` returns a plain `nn.Module` in eval mode on the CPU that maps
images in [0, 1] (B x 3 x H x W) to logits, with input normalisation inside, so any
attack library (torchattacks, AutoAttack, foolbox...) can be pointed at it directly.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from amoc.data.prepared import load_stats
from amoc.errors import CheckpointError, DataError
from amoc.io import remake_hint, torch_load, torch_save
from amoc.nets.dual_bn import Branch, DualBatchNorm2d
from amoc.nets.resnet import Encoder, build_encoder
from amoc.nets.store import encoder_meta

if TYPE_CHECKING:
    from amoc.config import Config

CLASSIFIER_FORMAT = "amoc-classifier/1"


class Classifier(nn.Module):
    """logits = head(encoder(x)), x in [0, 1]; head = Linear(feature_dim, num_classes).

    The head starts at zero (as the authors do), so a fresh classifier gives uniform logits.
    Every forward runs the encoder on `bn_branch` ("adv" by default: all downstream
    models use the adversarial BN), whatever the dual-BN switch was left at before, so
    training, attacks and evaluation always see the same network.
    """

    def __init__(self, encoder: Encoder, num_classes: int, bn_branch: Branch = "adv") -> None:
        super().__init__()
        if bn_branch not in ("clean", "adv"):
            raise ValueError(f"bn_branch must be 'clean' or 'adv', got {bn_branch!r}")
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.num_classes = num_classes
        self.bn_branch = bn_branch
        self._duals = [m for m in encoder.modules() if isinstance(m, DualBatchNorm2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B x 3 x H x W -> B x num_classes
        for m in self._duals:
            m.branch = self.bn_branch
        return self.head(self.encoder(x))


def save_classifier(path: str | os.PathLike, model: Classifier, provenance: dict[str, Any] | None = None) -> None:
    """Plain data and CPU tensors only, so `load_classifier` can use weights_only loading."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch_save(
        path,
        {
            "format": CLASSIFIER_FORMAT,
            "encoder": encoder_meta(model.encoder),
            "num_classes": int(model.num_classes),
            "bn_branch": model.bn_branch,
            "state_dict": state,
            "provenance": provenance or {},
        },
    )


def read_classifier(path: str | os.PathLike) -> tuple[Classifier, dict[str, Any]]:
    """(classifier in eval mode on the CPU, provenance dict); CheckpointError if the file
    is missing, corrupt, holds pickled code, or is not an amoc classifier."""
    blob = torch_load(path)  # weights_only: refuses pickled code
    if not isinstance(blob, dict) or blob.get("format") != CLASSIFIER_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(
            f"{path}: not an amoc classifier file (format {found!r}, expected {CLASSIFIER_FORMAT}); "
            "pass the classifier.pt written by `amoc probe` or `amoc finetune`"
        )
    try:
        meta = blob["encoder"]
        encoder = build_encoder(meta["arch"], meta["width"], meta["mean"], meta["std"])
        model = Classifier(encoder, int(blob["num_classes"]), blob["bn_branch"])
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: damaged amoc classifier file ({first}); {remake_hint(path)}") from None
    provenance = blob.get("provenance")
    return model.eval(), provenance if isinstance(provenance, dict) else {}


def check_classifier(
    model: Classifier, path: str | os.PathLike, *, num_classes: int, data: str | os.PathLike, width: float | None
) -> None:
    """Refuse a classifier that other params made: another number of classes than the data
    set in `data` has, or (when `width` is given: params' model.width) another encoder
    width. Such a file is stale, e.g. copied from another experiment or left from before a
    params change; one DataError line names it and the stage that makes it again."""
    if model.num_classes != num_classes:
        raise DataError(
            f"{path}: a classifier of {model.num_classes} classes, but the data set {data} has {num_classes}; it "
            f"was made for another data set: {remake_hint(path)}"
        )
    if width is not None and abs(model.encoder.width - width) > 1e-9:
        raise DataError(
            f"{path}: a classifier of width {model.encoder.width:g}, but params say model.width {width:g}; it was "
            f"made with other params: {remake_hint(path)}"
        )


def read_checked(path: str | os.PathLike, cfg: Config, data: str | os.PathLike) -> tuple[Classifier, dict[str, Any]]:
    """read_classifier, then check_classifier against the data set in `data` (its number
    of classes) and the params' model.width (unless the encoder was imported: it has its
    own width). Every stage that reads a classifier the DAG made goes through here."""
    model, provenance = read_classifier(path)
    num_classes = int(load_stats(data).get("num_classes", model.num_classes))
    width = None if cfg.pretrain.from_encoder.path else cfg.model.width
    check_classifier(model, path, num_classes=num_classes, data=data, width=width)
    return model, provenance


def load_classifier(path: str | os.PathLike) -> Classifier:
    """The classifier in `path`, in eval mode on the CPU (images in [0,1] -> logits)."""
    return read_classifier(path)[0]
