"""The contrastive loss, as a pure function."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """MoCo's InfoNCE: cross-entropy of logits = [q.k, q.queue] with the positive at 0.

    query, key: B x D, already L2-normalised and divided by sqrt(T) (as the networks
    emit them), so q.k = cos/T. queue: D x K negatives in the same scaled form (the
    model's queues store keys exactly as the key net emits them), so q.queue = cos/T.
    Computed in fp32 even under autocast: with |logits| up to 1/T, bf16 would lose
    the second decimal of every logit.
    """
    with torch.autocast(query.device.type, enabled=False):
        query, key, queue = query.float(), key.float(), queue.float()
        l_pos = (query * key).sum(dim=1, keepdim=True)  # B x 1
        l_neg = query @ queue  # B x K
        logits = torch.cat([l_pos, l_neg], dim=1)  # B x (1+K)
        labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
        return F.cross_entropy(logits, labels, reduction=reduction)
