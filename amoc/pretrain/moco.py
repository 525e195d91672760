"""The AMOC model (docs/pretrain.md): query and key networks, EMA, two memory queues.

The model owns the state of the method and nothing else: the step (step.py) and the
attack (attack.py) call its small methods. All state is in parameters and persistent
buffers, so ``state_dict()`` is a complete checkpoint of the method.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from amoc.config import Config
from amoc.nets import Encoder, bn_branch, build_encoder
from amoc.nets.dual_bn import Branch
from amoc.pretrain.variants import QueueName


def embed(net: nn.Module, x: torch.Tensor, branch: Branch, temperature: float) -> torch.Tensor:
    """x: B x 3 x H x W in [0,1] -> B x feature_dim, unit norm / sqrt(T), in fp32, with
    every dual BN of `net` on `branch`. Gradients flow as the caller allows (the attack
    differentiates through the key net to its input)."""
    with bn_branch(net, branch):
        z = net(x)
    return F.normalize(z.float(), dim=1) / math.sqrt(temperature)


def projector(in_dim: int, hidden_dim: int, feature_dim: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear, no BN (as the authors)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, feature_dim))


class MoCo(nn.Module):
    """f_q = projector(encoder); f_k = an EMA copy of f_q; queue_clean and queue_adv.

    Embeddings (queries, keys and queue entries alike) are L2-normalised and divided by
    sqrt(T), so every dot product is cos/T. The queues store keys in exactly that
    scaled form, including their random initial columns (normalised Gaussians divided
    by sqrt(T)); the authors store unit vectors and divide on every read, which gives
    the same logits.

    The key net is kept in the same train/eval mode as the query net (MoCo does the
    same): during training its BN uses batch statistics and updates its own running
    statistics, which the attack (eval mode) then uses. Its parameters are never
    trained: ``requires_grad`` is False and :meth:`update_key` is their only writer.
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        hidden_dim: int,
        feature_dim: int,
        temperature: float,
        key_momentum: float,
        queue_size: int,
        queue_size_adv: int,
    ) -> None:
        super().__init__()
        self.query = nn.Sequential(
            OrderedDict(encoder=encoder, projector=projector(encoder.feature_dim, hidden_dim, feature_dim))
        )
        self.key = copy.deepcopy(self.query)
        self.key.requires_grad_(False)
        self.temperature = temperature
        self.key_momentum = key_momentum
        self.register_buffer("queue_clean", self._random_keys(feature_dim, queue_size))  # D x K1
        self.register_buffer("queue_adv", self._random_keys(feature_dim, queue_size_adv))  # D x K2
        self.register_buffer("ptr_clean", torch.zeros((), dtype=torch.long))  # device-ok: moved with the module
        self.register_buffer("ptr_adv", torch.zeros((), dtype=torch.long))  # device-ok: moved with the module

    def _random_keys(self, dim: int, size: int) -> torch.Tensor:
        keys = torch.randn(dim, size)  # device-ok: at init, the seeded default generator; moved with the module
        return F.normalize(keys, dim=0) / math.sqrt(self.temperature)

    @property
    def encoder(self) -> Encoder:
        """The query encoder: the only part kept for downstream use."""
        return self.query.encoder

    # ------------------------------------------------------------------ embeddings
    def embed(self, net: nn.Module, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        return embed(net, x, branch, self.temperature)

    def queries(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        return self.embed(self.query, x, branch)

    @torch.no_grad()
    def keys(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        return self.embed(self.key, x, branch)

    # ------------------------------------------------------------------ queues
    def negatives(self, name: QueueName) -> torch.Tensor:
        """D x K keys of queue `name`, detached (reads never carry gradient)."""
        return self._queue(name)[0].detach()

    @torch.no_grad()
    def enqueue(self, name: QueueName, keys: torch.Tensor) -> None:
        """FIFO write of B keys at ptr..ptr+B (mod K), wrapping at the end of the ring;
        the pointer stays on the device, so this never syncs with the host."""
        queue, ptr = self._queue(name)
        size, batch = queue.shape[1], keys.shape[0]
        if batch > size:
            raise ValueError(f"cannot enqueue {batch} keys into queue_{name} of {size}")
        idx = torch.remainder(ptr + torch.arange(batch, device=queue.device), size)  # B
        queue.index_copy_(1, idx, keys.detach().t().to(queue.dtype))
        ptr.copy_(torch.remainder(ptr + batch, size))

    def _queue(self, name: QueueName) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "clean":
            return self.queue_clean, self.ptr_clean
        if name == "adv":
            return self.queue_adv, self.ptr_adv
        raise ValueError(f"unknown queue {name!r}; expected 'clean' or 'adv'")

    # ------------------------------------------------------------------ EMA
    def update_key(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q over the parameters (encoder and
        projector). BN running statistics are buffers and are not averaged (as in the authors' code)."""
        ema_update(self.key, self.query, self.key_momentum)


@torch.no_grad()
def ema_update(key: nn.Module, query: nn.Module, momentum: float) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q over every parameter, in place (two fused
    ops for the whole net); buffers such as BN running statistics are left alone."""
    key_params, query_params = list(key.parameters()), list(query.parameters())
    torch._foreach_mul_(key_params, momentum)
    torch._foreach_add_(key_params, query_params, alpha=1.0 - momentum)


class QueryPass(nn.Module):
    """The query net's training forwards of one step in one call: q_clean (clean BN) and,
    when given adversarial views, q_adv (adv BN). One call per step is what
    DistributedDataParallel needs (one forward, one backward); the parameters are the
    query net's own, shared with the model."""

    def __init__(self, model: MoCo) -> None:
        super().__init__()
        self.query = model.query
        self.temperature = model.temperature

    def forward(
        self, x_clean: torch.Tensor, x_adv: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q_clean = embed(self.query, x_clean, "clean", self.temperature)
        return q_clean, None if x_adv is None else embed(self.query, x_adv, "adv", self.temperature)


def build_moco(cfg: Config, mean: Sequence[float], std: Sequence[float]) -> MoCo:
    """The model a config describes; `mean`/`std` are the data's normalisation."""
    m = cfg.model
    encoder = build_encoder(m.arch, m.width, mean, std)
    return MoCo(
        encoder,
        hidden_dim=m.hidden_dim,
        feature_dim=m.feature_dim,
        temperature=m.temperature,
        key_momentum=m.key_momentum,
        queue_size=cfg.queue_size,
        queue_size_adv=cfg.queue_size_adv,
    )
