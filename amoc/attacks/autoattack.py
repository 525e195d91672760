"""Standard AutoAttack (L-inf), configured as the original.

torchattacks' "standard" ensemble (APGD-CE, APGD-T, FAB-T, Square 5000 queries) with two
settings of the original AutoAttack that torchattacks 3.3.0 does not use, which
`build_autoattack` restores: 100 iterations for APGD-CE, APGD-T and FAB-T (torchattacks
builds them with 10; Harry24k/adversarial-attacks-pytorch#196), 9 target classes for
APGD-T and FAB-T on every data set (torchattacks targets all n_classes - 1), and Square's fixed
schedule of the patch size (the original runs it with `resc_schedule=False`; torchattacks'
default True rescales the schedule to the query budget).
"""

from __future__ import annotations

import torch
from torch import nn

from amoc.attacks.accuracy import correct
from amoc.runtime import Runtime

AUTOATTACK_STEPS = 100  # APGD-CE, APGD-T and FAB-T iterations of standard AutoAttack
AUTOATTACK_QUERIES = 5000  # Square
AUTOATTACK_TARGETS = 9  # target classes of APGD-T and FAB-T on every data set (CIFAR-100 and ImageNet too)
SQUARE_RESCALE_SCHEDULE = False  # as the original standard AutoAttack


def build_autoattack(model: nn.Module, eps: float, num_classes: int, seed: int, steps: int | None = None):
    """torchattacks' standard AutoAttack with `steps` (default AUTOATTACK_STEPS) iterations
    for APGD-CE, APGD-T and FAB-T, and AUTOATTACK_QUERIES for Square with the original's
    fixed schedule (SQUARE_RESCALE_SCHEDULE)."""
    import torchattacks

    steps = AUTOATTACK_STEPS if steps is None else steps

    aa = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=num_classes, seed=seed)
    for sub in aa._autoattack.attacks:  # APGD, APGDT, FAB (multi-targeted), Square
        if hasattr(sub, "n_target_classes"):  # torchattacks takes n_classes - 1: 99 on CIFAR-100
            sub.n_target_classes = n_target_classes(num_classes)
        if hasattr(sub, "steps"):
            sub.steps = steps
        if hasattr(sub, "n_queries"):
            sub.n_queries = AUTOATTACK_QUERIES
            sub.rescale_schedule = SQUARE_RESCALE_SCHEDULE
    return aa


def n_target_classes(num_classes: int) -> int:
    """Target classes of APGD-T and FAB-T: the original's 9, fewer only where the data set has fewer."""
    return min(AUTOATTACK_TARGETS, num_classes - 1)


def autoattack_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    rt: Runtime,
    batch_size: int,
    eps: float,
    num_classes: int,
    seed: int,
    steps: int | None = None,
) -> tuple[torch.Tensor, float]:
    """(correct after AutoAttack, largest L-inf perturbation it returned)."""
    aa = build_autoattack(model, eps, num_classes, seed, steps)
    worst = [0.0]

    def attack(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        xb = xb.contiguous()  # torchattacks' FAB uses .view(): no channels_last inputs
        adv = aa(xb, yb).detach()
        worst[0] = max(worst[0], float((adv - xb).abs().amax()) if len(xb) else 0.0)
        return adv

    rng = torch.get_rng_state()  # torchattacks reseeds the global generator; leave it as found
    try:
        return correct(model, x, y, rt, batch_size, attack, desc="AutoAttack"), worst[0]
    finally:
        torch.set_rng_state(rng)


def torchattacks_version() -> str:
    try:
        from importlib.metadata import version

        return version("torchattacks")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "unknown"
