"""AMOC as a pre-training method (docs/pretrain.md): the MoCo model with two queues and
dual BN (moco.py), its contrastive attack (attack.py) and step (step.py), SGD."""

from __future__ import annotations

import math
from typing import Any

import torch

from amoc.config import Config
from amoc.distributed import Dist
from amoc.distributed.bn import ShuffledKeys, synchronise_bn
from amoc.pretrain.attack import ContrastiveAttack
from amoc.pretrain.methods import MethodRun
from amoc.pretrain.moco import MoCo, QueryPass, build_moco
from amoc.pretrain.step import TrainStep
from amoc.pretrain.variants import Variant
from amoc.runtime import Runtime
from amoc.schedule import scaled_lr
from amoc.training.hot import freeze_unused_bn, hot


def make_optimizer(model: MoCo, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """SGD on every query-net parameter, weight decay on all of them (the authors' choice:
    BN affine and biases included)."""
    p = cfg.pretrain
    return torch.optim.SGD(
        model.query.parameters(),
        lr=base_lr(cfg),
        momentum=p.momentum,
        weight_decay=p.weight_decay,
        fused=True if device.type == "cuda" else None,
    )


def base_lr(cfg: Config) -> float:
    p, d = cfg.pretrain, cfg.distributed
    return scaled_lr(p.lr, p.batch_size, d.lr_scaling, d.reference_batch)


def build(cfg: Config, stats: dict[str, Any], rt: Runtime, dist: Dist) -> MethodRun:
    """The variant's MoCo on the data's normalisation, BN across ranks per
    distributed.bn, SGD over the query net. Chance: log(K + 1)."""
    p, variant = cfg.pretrain, Variant.parse(cfg.variant)
    model = rt.prepare(build_moco(cfg, stats["mean"], stats["std"])).train()
    model.query = synchronise_bn(model.query, dist, cfg.distributed.bn)
    model.key = synchronise_bn(model.key, dist, cfg.distributed.bn)
    optimizer = make_optimizer(model, cfg, rt.device)
    # runtime.compile: the step's three kinds of forwards (the attack's, the key net's,
    # the query net's training pass) each get a compiled callable of their own, for the
    # step's fixed shapes (amoc.training.hot); the k-NN monitor runs the eager encoder.
    attack = ContrastiveAttack(
        model, variant, p.attack, autocast=rt.attack_autocast, dist=dist, embed=hot(model.embed, rt, "attack")
    )
    if not variant.adv_query:
        # The query pass never runs the query net's adv BN (CCC, CAC, CAA): frozen, it
        # leaves DDP no unused parameter to wait for, so DDP needs no find_unused_parameters
        # search every step. Its values do not change (SGD skips it either way).
        freeze_unused_bn(model.query, "clean")
    query_pass = dist.wrap(QueryPass(model))
    keys = hot(model.keys, rt, "keys")
    shuffled = ShuffledKeys(keys, dist) if dist.active and cfg.distributed.bn == "shuffle" else None
    step = TrainStep(
        model,
        variant,
        optimizer,
        attack,
        leverage=cfg.leverage,
        enqueue_order=p.enqueue_order,
        autocast=rt.autocast,
        query_pass=hot(query_pass, rt, "query_pass"),
        keys=shuffled or (lambda x, branch, generator=None: keys(x, branch)),
        gather=dist.gather,
    )
    return MethodRun(
        model=model,
        encoder=model.encoder,
        bn_branch=variant.encoder_bn_branch,
        optimizer=optimizer,
        step=step,
        augment=p.augment,
        base_lr=base_lr(cfg),
        has_adv_loss=variant.has_adv_loss,
        chance=math.log(cfg.queue_size + 1),
        chance_label="log(K+1)",
        record={
            "method": "amoc",
            "variant": variant.name,
            "queue_size": cfg.queue_size,
            "queue_size_adv": cfg.queue_size_adv,
            "leverage": cfg.leverage,
        },
    )
