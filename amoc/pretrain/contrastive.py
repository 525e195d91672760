"""What the in-batch contrastive methods share (ACL, RoCL; docs/methods.md): an encoder
with a projector, their projectors, and the NT-Xent of a step's views across ranks."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from amoc.config import ACLConfig, Config, RoCLConfig
from amoc.distributed import Dist
from amoc.distributed.bn import synchronise_bn
from amoc.nets import DualBatchNorm1d, Encoder, bn_branch, build_encoder
from amoc.nets.dual_bn import Branch
from amoc.pretrain.lars import LARS
from amoc.pretrain.ntxent import nt_xent
from amoc.runtime import Runtime
from amoc.schedule import scaled_lr
from amoc.training.hot import freeze_unused_bn, hot

if TYPE_CHECKING:
    from amoc.pretrain.methods import MethodRun


class ContrastiveNet(nn.Module):
    """projector(encoder(x)) with every dual BN on one branch; the encoder is what goes
    downstream. Outputs are not normalised (nt_xent does that, in fp32)."""

    def __init__(self, encoder: Encoder, projector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        with bn_branch(self, branch):
            return self.projector(self.encoder(x))


def bn_projector(in_dim: int, dims: list[int]) -> nn.Sequential:
    """ACL's projector: Linear (bias) -> dual BN -> ReLU, then Linear (no bias) -> dual BN
    -> ReLU for every further layer but the last, which ends on its dual BN."""
    layers: list[nn.Module] = []
    for i, out in enumerate(dims):
        layers += [nn.Linear(in_dim, out, bias=i == 0), DualBatchNorm1d(out)]
        if i < len(dims) - 1:
            layers.append(nn.ReLU(inplace=True))
        in_dim = out
    return nn.Sequential(*layers)


def mlp_projector(in_dim: int, dims: list[int]) -> nn.Sequential:
    """RoCL's projector: Linear -> ReLU -> ... -> Linear, biases, no BN."""
    layers: list[nn.Module] = []
    for i, out in enumerate(dims):
        layers.append(nn.Linear(in_dim, out))
        if i < len(dims) - 1:
            layers.append(nn.ReLU(inplace=True))
        in_dim = out
    return nn.Sequential(*layers)


def contrast(
    z: torch.Tensor, views: int, temperature: float, dist: Dist = Dist(), *, detach_keys: bool = False
) -> torch.Tensor:
    """nt_xent of this rank's anchors ``z`` (views x b rows, view-major) against every
    rank's rows of the same views (in-batch negatives across ranks, as RoCL's code
    gathers them). Each rank's loss is the mean over its anchors; with equal shards, the
    mean of the ranks' losses, which DDP's gradient average takes, is the global batch's
    loss, and `Dist.gather_grad` brings back the gradient of the other ranks' terms."""
    if not dist.active:
        return nt_xent(z, views, temperature, detach_keys=detach_keys)
    keys = torch.cat([dist.gather_grad(v) for v in z.chunk(views)])
    b = z.shape[0] // views
    return nt_xent(z, views, temperature, detach_keys=detach_keys, keys=keys, offset=dist.rank * b)


Autocast = Callable[[], contextlib.AbstractContextManager]


class InBatchStep:
    """What the steps of the in-batch methods hold: the network, the method's section, the
    optimiser, the training and attack precisions, the training forwards (`Forwards` of
    the subclass's module, or the DDP-wrapped one the stage hands in) and the ranks."""

    forwards_type: type[nn.Module]  # the method's module of training forwards

    def __init__(
        self,
        net: ContrastiveNet,
        cfg: ACLConfig | RoCLConfig,
        optimizer: torch.optim.Optimizer,
        *,
        autocast: Autocast = contextlib.nullcontext,
        attack_autocast: Autocast = contextlib.nullcontext,
        forwards: nn.Module | None = None,
        dist: Dist = Dist(),
    ) -> None:
        self.net, self.cfg, self.optimizer, self.dist = net, cfg, optimizer, dist
        self.autocast, self.attack_autocast = autocast, attack_autocast
        self.forwards = forwards or self.forwards_type(net)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ACL normalises with these


def build_run(
    cfg: Config,
    rt: Runtime,
    dist: Dist,
    *,
    section: ACLConfig | RoCLConfig,
    projector: Callable[[int, list[int]], nn.Module],
    normalize: tuple[Sequence[float], Sequence[float]],
    step: type,
    forwards: type,
    bn_branch: Branch,
    single_bn: bool,
    chance: float,
    chance_label: str,
) -> MethodRun:
    """The run of an in-batch method: its encoder (`normalize`: the mean and std inside
    it, as the method's code), `projector`, LARS over every trainable parameter, the
    training forwards under DDP (compiled with runtime.compile) and `step`. `single_bn`:
    the method has one BN, `bn_branch`; the other branch is frozen. BN across ranks
    follows distributed.bn; `shuffle` (MoCo's, for a key net) means per-rank here."""
    from amoc.pretrain.methods import MethodRun  # the table imports the methods

    m, p, d = cfg.model, cfg.pretrain, cfg.distributed
    encoder = build_encoder(m.arch, m.width, *normalize)
    net = rt.prepare(ContrastiveNet(encoder, projector(encoder.feature_dim, list(section.projector)))).train()
    net = synchronise_bn(net, dist, "local" if d.bn == "shuffle" else d.bn)
    if single_bn:
        freeze_unused_bn(net, bn_branch)
    lr = scaled_lr(section.lr, p.batch_size, d.lr_scaling, d.reference_batch)
    optimizer = LARS(
        [q for q in net.parameters() if q.requires_grad],
        lr=lr,
        momentum=section.momentum,
        weight_decay=section.weight_decay,
        trust=section.trust,
    )
    run_step = step(
        net,
        section,
        optimizer,
        autocast=rt.autocast,
        attack_autocast=rt.attack_autocast,
        forwards=hot(dist.wrap(forwards(net)), rt, "forwards"),
        dist=dist,
    )
    return MethodRun(
        model=net,
        encoder=net.encoder,
        bn_branch=bn_branch,
        optimizer=optimizer,
        step=run_step,
        augment=section.augment,
        base_lr=lr,
        has_adv_loss=True,
        chance=chance,
        chance_label=chance_label,
        record={"method": p.method, "temperature": section.temperature, "lr": lr, "optimizer": "LARS"},
    )
