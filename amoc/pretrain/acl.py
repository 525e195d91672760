"""ACL, its released DS variant (Jiang et al. 2020; docs/methods.md): dual BN through
encoder and projector, PGD on both views jointly against the adversarial pair's NT-Xent,
then loss = (NT-Xent of the clean pair, clean BN + NT-Xent of the adversarial pair,
adv BN) / 2, optimised with LARS. The adversarial-BN branch goes downstream."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from amoc.attacks.pgd import pgd
from amoc.config import Config
from amoc.distributed import Dist
from amoc.pretrain.contrastive import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ContrastiveNet,
    InBatchStep,
    bn_projector,
    build_run,
    contrast,
)
from amoc.runtime import Runtime, eval_mode, frozen

if TYPE_CHECKING:
    from amoc.pretrain.methods import MethodRun


class Forwards(nn.Module):
    """The step's two training forwards in one call (one forward per backward for DDP)."""

    def __init__(self, net: ContrastiveNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_clean: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x_clean, "clean"), self.net(x_adv, "adv")


class ACLStep(InBatchStep):
    """attack -> clean and adversarial forwards -> (L_clean + L_adv) / 2 -> LARS step."""

    forwards_type = Forwards

    def loss(self, z: torch.Tensor) -> torch.Tensor:
        return contrast(z, 2, self.cfg.temperature, self.dist)

    def attack(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Both views (stacked, view-major) perturbed jointly to maximise the NT-Xent of
        the adversarial pair: eval mode, adversarial BN, no parameter gradients."""
        net = self.net

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            with self.attack_autocast():
                z = net(x_adv, "adv")
            return self.loss(z)

        with eval_mode(net), frozen(net):
            shard = self.dist.shard(x.shape[0] // 2 * self.dist.world)  # each view's global batch
            return pgd(x, objective, self.cfg.attack, generator, shard, views=2)

    def __call__(
        self, x1: torch.Tensor, x2: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Two views of the same B images -> detached losses (loss, loss_clean, loss_adv)."""
        x = torch.cat([x1, x2])
        x_adv = self.attack(x, generator)
        with self.autocast():
            z_clean, z_adv = self.forwards(x, x_adv)
        loss_clean, loss_adv = self.loss(z_clean), self.loss(z_adv)
        loss = (loss_clean + loss_adv) / 2
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), "loss_clean": loss_clean.detach(), "loss_adv": loss_adv.detach()}


def build(cfg: Config, stats: dict[str, Any], rt: Runtime, dist: Dist) -> MethodRun:
    """ACL's run: ImageNet normalisation inside the encoder, the dual-BN projector; the
    adversarial branch goes downstream. Chance: log(2B - 1) for a global batch of B."""
    return build_run(
        cfg,
        rt,
        dist,
        section=cfg.pretrain.acl,
        projector=bn_projector,
        normalize=(IMAGENET_MEAN, IMAGENET_STD),
        step=ACLStep,
        forwards=Forwards,
        bn_branch="adv",
        single_bn=False,
        chance=math.log(2 * cfg.pretrain.batch_size - 1),
        chance_label="log(2B-1)",
    )
