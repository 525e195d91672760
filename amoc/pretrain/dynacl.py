"""DynACL (Luo, Wang & Wang, ICLR 2023; docs/methods.md), as released (PKU-ML/DYNACL at
7d143db, train_DynACL.py): ACL's DS with an EMA copy of the network, the key net, for the
second view, and two schedules stepped every `period` epochs.

- The query net (ACL's dual-BN encoder and projector) sees view 1, the key net view 2,
  in the attack and in training; no queue. The key net's parameters are an EMA of the
  query net's (momentum 0.99), updated after the step's forwards and before its optimiser
  step, as their code orders it; its BN statistics come from its own training forwards.
  The key net's encoder, adversarial BN, is what goes downstream.
- Loss: ((2 - w) NT-Xent(clean pair, clean BN) + w NT-Xent(adversarial pair, adv BN)) / 2.
- Schedules, for the 0-based epoch e and the horizon H (pretrain.epochs unless set):
  strength s(e) = 1 - period floor(e / period) / H (their `1 - (epoch - 1) / epochs` at
  the reload epochs 1, 1 + period, ... of their 1-based count), and weight
  w(e) = min(1 + floor((e + 1) / period) period / H swap, 2) (their 1-based
  `epoch // period`: w steps one epoch before s does). The augmentation at strength s:
  crop scale (1 - (1 - lo) s, hi), jitter, jitter_p and gray_p times s, flip unchanged.
  Both are pure functions of the epoch, so a resumed run re-derives them."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from amoc.attacks.pgd import pgd
from amoc.config import AugmentConfig, Config, DynACLConfig
from amoc.distributed import Dist
from amoc.distributed.bn import synchronise_bn
from amoc.nets import build_encoder
from amoc.pretrain.acl import Forwards
from amoc.pretrain.contrastive import IMAGENET_MEAN, IMAGENET_STD, Autocast, ContrastiveNet, bn_projector
from amoc.pretrain.lars import LARS
from amoc.pretrain.moco import ema_update
from amoc.pretrain.ntxent import nt_xent
from amoc.runtime import Runtime, eval_mode, frozen
from amoc.schedule import scaled_lr
from amoc.training.hot import hot

if TYPE_CHECKING:
    from amoc.pretrain.methods import MethodRun


# --------------------------------------------------------------------------- schedules
def horizon(cfg: DynACLConfig, epochs: int) -> int:
    """The epochs over which the strength falls from 1 to 0: their args.epochs."""
    return cfg.horizon or epochs


def strength(epoch: int, cfg: DynACLConfig, epochs: int) -> float:
    """The augmentation strength of 0-based `epoch` of a run of `epochs` (never below 0)."""
    return max(0.0, 1.0 - (cfg.period * (epoch // cfg.period)) / horizon(cfg, epochs))


def adv_weight(epoch: int, cfg: DynACLConfig, epochs: int) -> float:
    """The adversarial term's weight w in 0-based `epoch` (the clean term's is 2 - w)."""
    return min(1.0 + ((epoch + 1) // cfg.period) * (cfg.period / horizon(cfg, epochs)) * cfg.swap, 2.0)


def augmentation(base: AugmentConfig, s: float) -> AugmentConfig:
    """`base` (the augmentation at strength 1) at strength `s`."""
    if s == 1.0:
        return base
    lo, hi = base.crop_scale
    return dataclasses.replace(
        base,
        crop_scale=[1.0 - (1.0 - lo) * s, hi],
        jitter=[v * s for v in base.jitter],
        jitter_p=base.jitter_p * s,
        gray_p=base.gray_p * s,
    )


# --------------------------------------------------------------------------- model
class DynACLNet(nn.Module):
    """The query net (trained) and the key net, an EMA copy whose parameters
    :meth:`update_key` alone writes (``requires_grad`` False); BN running statistics are
    buffers, each net's from its own forwards."""

    def __init__(self, query: ContrastiveNet, key_momentum: float) -> None:
        super().__init__()
        self.query = query
        self.key = copy.deepcopy(query)
        self.key.requires_grad_(False)
        self.key_momentum = key_momentum

    def update_key(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q over every parameter (BN affine included)."""
        ema_update(self.key, self.query, self.key_momentum)


# --------------------------------------------------------------------------- step
class DynACLStep:
    """attack both views (view 2 through the key net) -> query forwards of view 1 and key
    forwards of view 2, clean and adversarial -> EMA update -> ((2 - w) L_clean + w L_adv) / 2
    -> LARS step. `begin_epoch` sets w for an epoch and returns its augmentation."""

    def __init__(
        self,
        net: DynACLNet,
        cfg: DynACLConfig,
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        autocast: Autocast = contextlib.nullcontext,
        attack_autocast: Autocast = contextlib.nullcontext,
        forwards: nn.Module | None = None,
        keys: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        dist: Dist = Dist(),
    ) -> None:
        self.net, self.cfg, self.optimizer, self.dist, self.epochs = net, cfg, optimizer, dist, epochs
        self.autocast, self.attack_autocast = autocast, attack_autocast
        self.forwards = forwards or Forwards(net.query)  # query net: (view 1, adversarial view 1)
        self.keys = keys or Forwards(net.key)  # key net: (view 2, adversarial view 2)
        self.weight = adv_weight(0, cfg, epochs)

    def begin_epoch(self, epoch: int) -> AugmentConfig:
        self.weight = adv_weight(epoch, self.cfg, self.epochs)
        return augmentation(self.cfg.augment, strength(epoch, self.cfg, self.epochs))

    def loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """NT-Xent of the pair (view 1 through the query net, view 2 through the key net),
        this rank's anchors against every rank's rows (as `contrastive.contrast`). An
        embedding without a gradient (the key net's in training) is gathered plainly; one
        with (the attack's, through its input) through `Dist.gather_grad`, so that every
        rank's perturbation follows the global batch's loss."""
        z = torch.cat([q, k])
        if not self.dist.active:
            return nt_xent(z, 2, self.cfg.temperature)
        keys = torch.cat([self.dist.gather_grad(v) if v.requires_grad else self.dist.gather(v) for v in (q, k)])
        return nt_xent(z, 2, self.cfg.temperature, keys=keys, offset=self.dist.rank * q.shape[0])

    def attack(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Both views (stacked, view-major) perturbed jointly to maximise the adversarial
        pair's NT-Xent, view 1 through the query net and view 2 through the key net: eval
        mode, adversarial BN, no parameter gradients."""
        net, b = self.net, x.shape[0] // 2

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            with self.attack_autocast():
                q, k = net.query(x_adv[:b], "adv"), net.key(x_adv[b:], "adv")
            return self.loss(q, k)

        with eval_mode(net), frozen(net):
            return pgd(x, objective, self.cfg.attack, generator, self.dist.shard(b * self.dist.world), views=2)

    def __call__(
        self, x1: torch.Tensor, x2: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Two views of the same B images -> detached losses (loss, loss_clean, loss_adv:
        the two NT-Xent terms before weighting)."""
        b = x1.shape[0]
        x_adv = self.attack(torch.cat([x1, x2]), generator)
        with self.autocast():
            q_clean, q_adv = self.forwards(x1, x_adv[:b])
            with torch.no_grad():
                k_clean, k_adv = self.keys(x2, x_adv[b:])
        self.net.update_key()  # their order: after the forwards, with the query net before its step
        loss_clean, loss_adv = self.loss(q_clean, k_clean), self.loss(q_adv, k_adv)
        w = self.weight
        loss = ((2.0 - w) * loss_clean + w * loss_adv) / 2
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), "loss_clean": loss_clean.detach(), "loss_adv": loss_adv.detach()}


def build(cfg: Config, stats: dict[str, Any], rt: Runtime, dist: Dist) -> MethodRun:
    """DynACL's run: ACL's network (ImageNet normalisation inside the encoder, the dual-BN
    projector) and its EMA copy, LARS over the query net; the key net's encoder, adversarial
    branch, goes downstream. Under DDP only the query forwards are wrapped; the key net runs
    per rank outside it, with BN across ranks per distributed.bn (`shuffle`: per rank).
    Chance: log(2B - 1) for a global batch of B."""
    from amoc.pretrain.methods import MethodRun  # the table imports the methods

    m, p, d, s = cfg.model, cfg.pretrain, cfg.distributed, cfg.pretrain.dynacl
    encoder = build_encoder(m.arch, m.width, IMAGENET_MEAN, IMAGENET_STD)
    query = rt.prepare(ContrastiveNet(encoder, bn_projector(encoder.feature_dim, list(s.projector)))).train()
    net = DynACLNet(query, s.key_momentum)
    bn = "local" if d.bn == "shuffle" else d.bn
    net.query, net.key = synchronise_bn(net.query, dist, bn), synchronise_bn(net.key, dist, bn)
    net.key.requires_grad_(False)  # gloo's rank-spanning BN layers are new modules
    lr = scaled_lr(s.lr, p.batch_size, d.lr_scaling, d.reference_batch)
    optimizer = LARS(net.query.parameters(), lr=lr, momentum=s.momentum, weight_decay=s.weight_decay, trust=s.trust)
    step = DynACLStep(
        net,
        s,
        optimizer,
        epochs=p.epochs,
        autocast=rt.autocast,
        attack_autocast=rt.attack_autocast,
        forwards=hot(dist.wrap(Forwards(net.query)), rt, "forwards"),
        keys=hot(Forwards(net.key), rt, "keys"),
        dist=dist,
    )
    return MethodRun(
        model=net,
        encoder=net.key.encoder,
        bn_branch="adv",
        optimizer=optimizer,
        step=step,
        augment=augmentation(s.augment, strength(0, s, p.epochs)),
        base_lr=lr,
        has_adv_loss=True,
        chance=math.log(2 * p.batch_size - 1),
        chance_label="log(2B-1)",
        record={
            "method": p.method,
            "temperature": s.temperature,
            "lr": lr,
            "optimizer": "LARS",
            "key_momentum": s.key_momentum,
        },
        begin_epoch=step.begin_epoch,
    )
