"""One AMOC training iteration (docs/pretrain.md), written as the algorithm reads."""

from __future__ import annotations

import contextlib
from typing import Callable, Literal

import torch

from amoc.pretrain.attack import ContrastiveAttack
from amoc.pretrain.losses import info_nce
from amoc.pretrain.moco import MoCo, QueryPass
from amoc.pretrain.variants import Variant

EnqueueOrder = Literal["moco", "authors"]


class TrainStep:
    """attack -> keys -> queries -> loss -> SGD step -> EMA -> enqueue.

    Forwards and BN branches (query net in train mode; the key net too, so its BN uses
    batch statistics as in MoCo, always under no_grad):

    - key net, clean key view, clean BN -> k_clean (positive of L_clean, enters queue_clean)
    - key net, adversarial key view, adv BN -> k_adv (CAx / AAx only; enters queue_adv)
    - key net, adversarial query view, adv BN (ACA+ only; enters queue_adv)
    - query net, clean query view, clean BN -> q_clean
    - query net, adversarial query view, adv BN -> q_adv (ACx / AAx only)

    Where the variant's table says "reused", L_adv takes q_clean or k_clean from the
    clean forwards instead of running them again.

    ``enqueue_order``:

    - "moco": the batch's keys enter the queues after the logits have been computed
      (here: after the update), so the negatives are the keys of earlier batches only.
    - "authors": the keys enter the queues before the negatives are read, as in the
      authors' code (their key forward enqueues), so every positive key also appears
      once among its own query's negatives, and the oldest B keys of each written
      queue have already left it.

    Data-parallel runs (amoc.distributed) plug in three pieces; the defaults are one
    process: ``query_pass`` (the QueryPass under DistributedDataParallel), ``keys`` (the
    key net's training forward, e.g. shuffle-BN's ShuffledKeys) and ``gather`` (this
    step's keys from every rank, in rank order, so every rank enqueues the same global
    batch of keys and the queues stay identical).
    """

    def __init__(
        self,
        model: MoCo,
        variant: Variant,
        optimizer: torch.optim.Optimizer,
        attack: ContrastiveAttack,
        *,
        leverage: float,
        enqueue_order: EnqueueOrder = "authors",
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        query_pass: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None,
        keys: Callable[..., torch.Tensor] | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] = lambda k: k,
    ) -> None:
        if enqueue_order not in ("moco", "authors"):
            raise ValueError(f"enqueue_order must be 'moco' or 'authors', got {enqueue_order!r}")
        self.model = model
        self.variant = variant
        self.optimizer = optimizer
        self.attack = attack
        self.leverage = leverage
        self.enqueue_order = enqueue_order
        self.autocast = autocast
        self.query_pass = query_pass or QueryPass(model)
        self.keys = keys or (lambda x, branch, generator=None: model.keys(x, branch))
        self.gather = gather

    def __call__(
        self, x_query: torch.Tensor, x_key: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Two views of the same B images (B x 3 x H x W in [0,1]) -> detached losses
        on the device: loss, loss_clean and (not for CCC) loss_adv. No host sync."""
        v, model = self.variant, self.model

        # 1. Adversarial views: PGD on L_adv, model in eval mode, queues read only.
        x_query_adv, x_key_adv = self.attack(x_query, x_key, generator)

        # 2. Keys: key net, no gradient.
        with self.autocast():
            k_clean = self.keys(x_key, "clean", generator)
            k_adv = self.keys(x_key_adv, "adv", generator) if v.adv_key else k_clean
            if v.adv_enqueue == "adv_keys":  # CAx, AAx
                new_adv = k_adv
            elif v.adv_enqueue == "adv_query_keys":  # ACA+: key net on the adversarial query views
                new_adv = self.keys(x_query_adv, "adv", generator)
            else:  # CCC, ACC, ACA: queue_adv is never written
                new_adv = None
        if self.enqueue_order == "authors":
            self._enqueue(k_clean, new_adv)

        # 3. Queries and losses. The negatives are read now (after the enqueue in
        #    the authors' order, before it in MoCo's).
        with self.autocast():
            q_clean, q_adv = self.query_pass(x_query, x_query_adv if v.adv_query else None)
        if not v.adv_query:
            q_adv = q_clean
        loss_clean = info_nce(q_clean, k_clean, model.negatives("clean"))
        losses = {"loss_clean": loss_clean}
        if v.has_adv_loss:
            loss_adv = info_nce(q_adv, k_adv, model.negatives(v.negatives))
            loss = self.leverage * loss_clean + (1 - self.leverage) * loss_adv
            losses["loss_adv"] = loss_adv
        else:  # CCC: plain MoCo
            loss = loss_clean

        # 4. Update the query net, then the key net (EMA), then the queues.
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        model.update_key()
        if self.enqueue_order == "moco":
            self._enqueue(k_clean, new_adv)
        return {"loss": loss.detach(), **{name: value.detach() for name, value in losses.items()}}

    def _enqueue(self, k_clean: torch.Tensor, new_adv: torch.Tensor | None) -> None:
        self.model.enqueue("clean", self.gather(k_clean))
        if new_adv is not None:
            self.model.enqueue("adv", self.gather(new_adv))
