"""L-inf PGD with an injectable objective.

One implementation serves pre-training (objective = the variant's contrastive loss)
and downstream training/evaluation (cross-entropy or the TRADES KL term). Each step
costs a forward plus a backward *to the input only* (`torch.autograd.grad`), so no
weight gradients are computed or accumulated.
"""

from __future__ import annotations

from typing import Callable

import torch

from amoc.config import AttackConfig
from amoc.distributed import Shard

Objective = Callable[[torch.Tensor], torch.Tensor]


def pgd_linf(
    x: torch.Tensor,
    objective: Objective,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Maximise `objective(x_adv)` (a scalar; sum over the batch so every sample's
    step is independent of batch size) over the eps-ball around x, images in [0, 1].

    `start` (optional) is the first iterate, e.g. TRADES' x + 0.001 * N(0, 1); it is
    projected onto the ball and [0, 1] and replaces the uniform random start.

    Returns a detached tensor with ||x_adv - x||_inf <= eps and 0 <= x_adv <= 1.
    The caller chooses train/eval mode and BN branch; this function changes neither.
    """
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    if start is not None:
        x_adv = torch.min(torch.max(start.detach(), x - eps), x + eps).clamp_(0, 1)
    elif random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = (x + (2 * noise - 1) * eps).clamp_(0, 1)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = objective(x_adv)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def global_start(
    x: torch.Tensor, attack: AttackConfig, generator: torch.Generator | None, shard: Shard, views: int = 1
) -> torch.Tensor | None:
    """PGD's uniform random start for this rank's rows of a data-parallel batch: the
    noise is drawn for the whole global batch (as one process draws it) and cut to this
    rank's rows, so no image's start depends on the number of ranks. `x` stacks `views`
    groups of this rank's rows (the pre-training attack perturbs two views at once).

    None in a single process, or when the attack draws nothing: `pgd_linf` then makes the
    same draw itself."""
    if shard.world == 1 or not (attack.random_start and attack.eps > 0 and attack.steps > 0):
        return None
    noise = torch.rand((views, shard.total, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
    noise = shard.rows(noise, dim=1).reshape(x.shape)  # views x rows -> x's layout
    return x + (2 * noise - 1) * attack.eps


def pgd(
    x: torch.Tensor,
    objective: Objective,
    attack: AttackConfig,
    generator: torch.Generator | None = None,
    shard: Shard = Shard(),
    views: int = 1,
) -> torch.Tensor:
    """`pgd_linf` with the settings of an `AttackConfig` (eps, step = step_ratio * eps,
    steps, random start) and the global-batch start of a data-parallel `shard`."""
    return pgd_linf(
        x,
        objective,
        eps=attack.eps,
        step_size=attack.step_size,
        steps=attack.steps,
        random_start=attack.random_start,
        generator=generator,
        start=global_start(x, attack, generator, shard, views),
    )
