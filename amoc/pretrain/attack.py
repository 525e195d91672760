"""The pre-training attack (docs/pretrain.md): PGD on the variant's contrastive loss."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from amoc.attacks.pgd import pgd
from amoc.config import AttackConfig
from amoc.distributed import Dist
from amoc.nets.dual_bn import Branch
from amoc.pretrain.losses import info_nce
from amoc.pretrain.moco import MoCo
from amoc.pretrain.variants import Variant
from amoc.runtime import eval_mode, frozen

Views = tuple[torch.Tensor | None, torch.Tensor | None]


class ContrastiveAttack:
    """L-inf PGD (eps, step = step_ratio * eps, steps, random start) maximising the
    variant's L_adv: info_nce(query, key, the variant's negative queue), summed over
    the batch.

    Contract: views are B x 3 x H x W in [0,1]. The whole model is in eval mode while
    attacking (BN running statistics) and restored afterwards; nothing is enqueued and
    no parameter gradient is computed. The two views are attacked jointly, but only
    the view(s) the variant makes adversarial are perturbed: they run through their
    network with the adv BN branch (query view -> query net, key view -> key net),
    while the other view's embedding is computed once (it does not change between
    PGD steps), without gradient, with the clean BN branch and, like everything in
    the attack, in eval mode. PGD's random start uses `generator`; in a data-parallel
    run (`dist`) it is drawn for the global batch and each rank keeps its rows, so the
    start of every image does not depend on the number of ranks. Every forward goes
    through `embed(net, x, branch)` (default `model.embed`; `amoc pretrain` passes its
    compiled twin under runtime.compile, amoc.training.hot).
    """

    def __init__(
        self,
        model: MoCo,
        variant: Variant,
        cfg: AttackConfig,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        dist: Dist = Dist(),
        embed: Callable[[nn.Module, torch.Tensor, Branch], torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.embed = embed or model.embed
        self.variant = variant
        self.cfg = cfg
        self.autocast = autocast
        self.dist = dist

    def __call__(self, x_query: torch.Tensor, x_key: torch.Tensor, generator: torch.Generator | None = None) -> Views:
        """-> (adversarial query view, adversarial key view); None where the variant
        keeps the view clean (both None for CCC)."""
        v, model, embed = self.variant, self.model, self.embed
        if not v.has_adv_loss:
            return None, None
        batch = x_query.shape[0]
        with eval_mode(model), frozen(model.query):
            negatives = model.negatives(v.negatives)  # D x K, read only
            with torch.no_grad(), self.autocast():
                query = None if v.adv_query else embed(model.query, x_query, "clean")
                key = None if v.adv_key else embed(model.key, x_key, "clean")
            views = [x for x, adv in ((x_query, v.adv_query), (x_key, v.adv_key)) if adv]
            x = torch.cat(views) if len(views) == 2 else views[0]  # (1 or 2)B x 3 x H x W

            def objective(x_adv: torch.Tensor) -> torch.Tensor:
                parts = iter(x_adv.split(batch))
                with self.autocast():
                    q = embed(model.query, next(parts), "adv") if v.adv_query else query
                    k = embed(model.key, next(parts), "adv") if v.adv_key else key
                return info_nce(q, k, negatives, reduction="sum")

            shard = self.dist.shard(batch * self.dist.world)  # the global batch of each view
            x_adv = pgd(x, objective, self.cfg, generator, shard, views=len(views))
        parts = iter(x_adv.split(batch))
        return (next(parts) if v.adv_query else None), (next(parts) if v.adv_key else None)
