"""Dual BatchNorm: separate statistics (and affine parameters) for clean and
adversarial inputs, selected by one switch set on the whole model at once."""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
from torch import nn

Branch = Literal["clean", "adv"]


class DualBatchNorm(nn.Module):
    """Two BN layers, `clean` and `adv`, and a switch that picks one for every forward."""

    norm: type[nn.modules.batchnorm._BatchNorm] = nn.BatchNorm2d

    def __init__(self, num_features: int, affine: bool = True) -> None:
        super().__init__()
        self.clean = self.norm(num_features, affine=affine)
        self.adv = self.norm(num_features, affine=affine)
        self.branch: Branch = "clean"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clean(x) if self.branch == "clean" else self.adv(x)

    def extra_repr(self) -> str:
        return f"branch={self.branch}"


class DualBatchNorm2d(DualBatchNorm):
    """Dual BN of a convolutional encoder (B x C x H x W)."""


class DualBatchNorm1d(DualBatchNorm):
    """Dual BN of a projector (B x D): ACL's BN projector."""

    norm = nn.BatchNorm1d


def other_branch(branch: Branch) -> Branch:
    """The branch that is not `branch`."""
    if branch not in ("clean", "adv"):
        raise ValueError(f"BN branch must be 'clean' or 'adv', got {branch!r}")
    return "adv" if branch == "clean" else "clean"


def set_bn_branch(model: nn.Module, branch: Branch) -> None:
    if branch not in ("clean", "adv"):
        raise ValueError(f"BN branch must be 'clean' or 'adv', got {branch!r}")
    for m in model.modules():
        if isinstance(m, DualBatchNorm):
            m.branch = branch


@contextlib.contextmanager
def bn_branch(model: nn.Module, branch: Branch) -> Iterator[nn.Module]:
    """Run a block with every dual BN of `model` on `branch`, then restore."""
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm)]
    before = [m.branch for m in duals]
    set_bn_branch(model, branch)
    try:
        yield model
    finally:
        for m, b in zip(duals, before):
            m.branch = b
