"""The cross-entropy objective: untargeted PGD on a classifier's loss (PGD-AT training,
PGD-20 evaluation, transfer examples)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from amoc.attacks.pgd import Objective, pgd
from amoc.config import AttackConfig
from amoc.distributed import Shard

Model = Callable[[torch.Tensor], torch.Tensor]


def ce_objective(model: Model, y: torch.Tensor) -> Objective:
    """x_adv -> cross-entropy of model(x_adv) against y, summed so every image's PGD step
    is independent of the batch size."""

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x_adv).float(), y, reduction="sum")

    return objective


def ce_pgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackConfig,
    generator: torch.Generator | None = None,
    shard: Shard = Shard(),
) -> torch.Tensor:
    """Untargeted L-inf PGD on the cross-entropy, images in [0, 1]. The caller chooses
    the model's mode (attacks run in eval mode). `shard`: x is this rank's part of a
    global batch (the random start is drawn for all of it)."""
    return pgd(x, ce_objective(model, y), attack, generator, shard)
