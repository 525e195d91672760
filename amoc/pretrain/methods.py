"""The pre-training methods (docs/methods.md): `pretrain.method` -> a module's `build`.

A method turns the config into a `MethodRun`: the model it learns, the encoder it hands
downstream (and its BN branch), the optimiser, the step, its augmentation and what the
run records. The stage (amoc.pretrain.stage) owns everything else: data, epochs, the
learning-rate schedule, resume, DDP, the k-NN monitor and the outputs. Adding a method
is one module with a `build` plus a row in `METHODS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from amoc.config import AugmentConfig, Config, to_dict
from amoc.distributed import Dist
from amoc.nets import Encoder
from amoc.nets.dual_bn import Branch
from amoc.runtime import Runtime

Step = Callable[[torch.Tensor, torch.Tensor, "torch.Generator | None"], dict[str, torch.Tensor]]


@dataclass
class MethodRun:
    model: nn.Module  # everything the method learns: its state_dict is what a checkpoint holds
    encoder: Encoder  # what goes downstream
    bn_branch: Branch  # the encoder's branch downstream and in the k-NN monitor
    optimizer: torch.optim.Optimizer
    step: Step  # two views of a batch (and the run's generator) -> detached losses
    augment: AugmentConfig
    base_lr: float  # the peak of the warm-up + cosine schedule
    has_adv_loss: bool
    chance: float  # the loss_clean of a model that has learnt nothing (the collapse warning)
    chance_label: str  # how docs write it, e.g. "log(K+1)"
    record: dict[str, Any] = field(default_factory=dict)  # settings for summary.json and encoder.pt
    # Per-epoch schedules (DynACL): called by the stage at the start of every epoch, a resumed
    # one included (0-based); sets the method's state for that epoch and returns that epoch's
    # augmentation, which the stage switches to when it differs. Both are a pure function of
    # the epoch, so a resumed run re-derives them. None: the same every epoch.
    begin_epoch: Callable[[int], AugmentConfig] | None = None


# pretrain.method -> what it is; the method's module amoc.pretrain.<name> has `build`.
METHODS = {
    "amoc": "MoCo with adversarial views, two memory queues and dual BN (the paper)",
    "acl": "ACL (Jiang et al. 2020), DS: in-batch NT-Xent of clean and adversarial pairs, dual BN, LARS",
    "rocl": "RoCL (Kim et al. 2020): instance-wise attack, NT-Xent over (t1, t2, adversarial t1), LARS",
    "dynacl": "DynACL (Luo et al. 2023): ACL with an EMA key encoder, augmentation annealed, adversarial weight raised",
}
AMOC_ONLY = ("variant", "queue_size", "leverage")  # top-level keys only AMOC reads


def build(cfg: Config, stats: dict[str, Any], rt: Runtime, dist: Dist = Dist()) -> MethodRun:
    """The configured method's run; `stats` are the data's (mean and std, num_classes)."""
    return importlib.import_module(f"amoc.pretrain.{cfg.pretrain.method}").build(cfg, stats, rt, dist)


def method_params(cfg: Config) -> dict[str, Any]:
    """The params the configured method reads (the run's fingerprint): the shared
    schedule, and the method's own section; AMOC's also its top-level keys."""
    p = to_dict(cfg.pretrain)
    p.pop("checkpoint_every")  # where a run stops, not what it computes
    p.pop("from_encoder")  # an imported encoder is not trained: no run to resume
    own = {k: p.pop(k) for k in ("acl", "rocl", "dynacl")}
    shared = {k: p.pop(k) for k in ("method", "epochs", "batch_size", "warmup_epochs", "knn_k", "knn_every")}
    if cfg.pretrain.method == "amoc":
        top = {"variant": cfg.variant, "queue_size": cfg.queue_size, "queue_size_adv": cfg.queue_size_adv}
        return {**shared, **p, **top, "leverage": cfg.leverage, "model": to_dict(cfg.model)}
    model = {k: v for k, v in to_dict(cfg.model).items() if k in ("arch", "width")}
    return {**shared, cfg.pretrain.method: own[cfg.pretrain.method], "model": model}
