"""RoCL (Kim, Tack & Hwang 2020; docs/methods.md): one BN, an instance-wise attack on the
first view against its NT-Xent with the second, then NT-Xent over (t1, t2, adversarial
t1) with two positives per anchor, plus NT-Xent(adversarial t1, t2) times a small weight
(1/256), optimised with LARS. As in their code, the key side of every similarity matrix
is detached and the regulariser is a second training forward.

amoc's encoder has dual BN; RoCL trains one branch, the adversarial one (what every
downstream stage reads), for clean and adversarial inputs alike, and leaves the clean
branch frozen at its initial values."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from amoc.attacks.pgd import pgd
from amoc.config import Config
from amoc.distributed import Dist
from amoc.pretrain.contrastive import ContrastiveNet, InBatchStep, build_run, contrast, mlp_projector
from amoc.runtime import Runtime, eval_mode, frozen

if TYPE_CHECKING:
    from amoc.pretrain.methods import MethodRun

BRANCH = "adv"  # the single BN RoCL trains


class Forwards(nn.Module):
    """The step's two training forwards in one call (one forward per backward for DDP)."""

    def __init__(self, net: ContrastiveNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_three: torch.Tensor, x_pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x_three, BRANCH), self.net(x_pair, BRANCH)


class RoCLStep(InBatchStep):
    """attack t1 -> forwards of (t1, t2, adv) and (adv, t2) -> 3-view NT-Xent + weight x
    2-view NT-Xent -> LARS step."""

    forwards_type = Forwards

    def loss(self, z: torch.Tensor, views: int) -> torch.Tensor:
        return contrast(z, views, self.cfg.temperature, self.dist, detach_keys=True)

    def attack(self, x1: torch.Tensor, x2: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """t1 perturbed to maximise NT-Xent(adversarial t1, t2): eval mode, its start
        uniform in the eps-ball around t1; t2's embedding does not change between steps."""
        net = self.net
        with eval_mode(net), frozen(net):
            with torch.no_grad(), self.attack_autocast():
                z2 = net(x2, BRANCH)

            def objective(x_adv: torch.Tensor) -> torch.Tensor:
                with self.attack_autocast():
                    z = net(x_adv, BRANCH)
                return self.loss(torch.cat([z, z2.to(z.dtype)]), 2)

            return pgd(x1, objective, self.cfg.attack, generator, self.dist.shard(x1.shape[0] * self.dist.world))

    def __call__(
        self, x1: torch.Tensor, x2: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Two views of the same B images -> detached losses: loss, loss_clean (the
        3-view NT-Xent) and loss_adv (the weighted regulariser)."""
        x_adv = self.attack(x1, x2, generator)
        with self.autocast():
            z_three, z_pair = self.forwards(torch.cat([x1, x2, x_adv]), torch.cat([x_adv, x2]))
        loss_sim = self.loss(z_three, 3)
        loss_reg = self.cfg.regularizer * self.loss(z_pair, 2)
        loss = loss_sim + loss_reg
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), "loss_clean": loss_sim.detach(), "loss_adv": loss_reg.detach()}


def build(cfg: Config, stats: dict[str, Any], rt: Runtime, dist: Dist) -> MethodRun:
    """RoCL's run: no normalisation (their model reads [0, 1] pixels), the MLP projector,
    one BN. Chance: 2 log(3B - 1), two positives per anchor among 3B - 1 candidates."""
    return build_run(
        cfg,
        rt,
        dist,
        section=cfg.pretrain.rocl,
        projector=mlp_projector,
        normalize=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        step=RoCLStep,
        forwards=Forwards,
        bn_branch=BRANCH,
        single_bn=True,
        chance=2 * math.log(3 * cfg.pretrain.batch_size - 1),
        chance_label="2 log(3B-1)",
    )
