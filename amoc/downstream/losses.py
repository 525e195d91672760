"""Downstream training losses and their training-time attacks.

- CE (SLF): cross-entropy on clean images.
- PGD-AT (Madry et al.): cross-entropy on PGD examples that maximise the cross-entropy,
  started uniformly in the eps-ball (if the attack's random_start is set); the attack is
  `amoc.attacks.ce.ce_pgd`.
- TRADES (Zhang et al.): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), batch mean, where
  x_adv maximises the same KL term, starting uniformly in the eps-ball (the authors'
  foolbox LinfPGDKLDiv; `trades_start: uniform`, the default) or at x + 0.001 * N(0, 1)
  (the TRADES code; `normal`), whatever random_start says. As in the TRADES code, the KL is
  `kl_div(log_softmax(f(x_adv)), softmax(f(x)))`, which the paper writes KL(f(x_adv) || f(x)).

`trades_attack` only crafts examples: the caller puts the model in eval mode
(running BN statistics) around them, as the authors do.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

from amoc.attacks.pgd import pgd_linf
from amoc.config import AttackConfig
from amoc.distributed import Shard

Model = Callable[[torch.Tensor], torch.Tensor]

TRADES_START_STD = 0.001
TradesStart = Literal["uniform", "normal"]


def trades_kl(logits_nat: torch.Tensor, logits_adv: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """sum_c p_nat * (log p_nat - log p_adv), per TRADES; logits: B x classes."""
    return F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_nat.float(), dim=1), reduction=reduction)


def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """CE(f(x), y) + beta * KL, both batch means. Equals CE when logits_adv == logits_nat."""
    return F.cross_entropy(logits_nat.float(), y) + beta * trades_kl(logits_nat, logits_adv)


def trades_attack(
    model: Model,
    x: torch.Tensor,
    attack: AttackConfig,
    generator: torch.Generator | None = None,
    shard: Shard = Shard(),
    start: TradesStart = "uniform",
) -> torch.Tensor:
    """TRADES inner maximisation of the KL term around x (images in [0, 1]), from `start`:
    "uniform" in the eps-ball (the authors' foolbox LinfPGDKLDiv) or "normal",
    x + 0.001 * N(0, 1) (the TRADES paper's code). `shard`: x is this rank's part of a
    global batch (the start noise is drawn for all of it)."""
    with torch.no_grad():
        p_nat = F.softmax(model(x).float(), dim=1)  # fixed target, B x classes
    draw = torch.rand if start == "uniform" else torch.randn
    noise = shard.sample(lambda shape: draw(shape, generator=generator, device=x.device, dtype=x.dtype), x.shape)
    first = x + ((2 * noise - 1) * attack.eps if start == "uniform" else TRADES_START_STD * noise)

    def objective(x_adv: torch.Tensor) -> torch.Tensor:  # summed: per-sample steps
        return F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), p_nat, reduction="sum")

    return pgd_linf(
        x, objective, eps=attack.eps, step_size=attack.step_size, steps=attack.steps, generator=generator, start=first
    )
