"""BatchNorm across ranks (`distributed.bn`), for multi-process runs only.

- ``sync``: every training-mode BN normalises with the statistics of the whole global
  batch, exactly as one process with that batch would (the paper's setting). On CUDA this
  is torch's ``nn.SyncBatchNorm``; torch refuses it on the CPU, so gloo runs (tests,
  CPU clusters) use :class:`GlobalBatchNorm2d` (and :class:`GlobalBatchNorm1d` for a
  projector's BN), the same computation with two differentiable all-reduces.
- ``shuffle``: MoCo's shuffle-BN for the key net (:class:`ShuffledKeys`); the query net
  keeps per-rank statistics.
- ``local``: per-rank statistics everywhere (cheapest; batch statistics over B / N).

Eval-mode BN (attacks, k-NN, evaluation) reads running statistics and needs none of this.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from amoc.distributed import Dist

BNMode = Literal["sync", "shuffle", "local"]

# torch suggests a private module instead; the public differentiable all_reduce is what
# GlobalBatchNorm2d needs, so its notice would only clutter every CPU rank's log.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated", category=FutureWarning
)


class _GlobalStatistics:
    """BatchNorm whose training-mode statistics span every rank's batch (mixed into
    nn.BatchNorm1d / 2d, statistics over every dimension but the channels).

    Two-pass and differentiable: the global mean from an all-reduce of per-channel sums
    and counts, then the global biased variance from an all-reduce of squared deviations.
    The all-reduces' backward sums the gradients of the statistics over the ranks, which
    is what DDP's gradient averaging needs to reproduce the gradient of the global batch.
    Running statistics are updated as nn.BatchNorm does (unbiased variance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = (0, *range(2, x.dim()))
        shape = (1, c) + (1,) * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([xf.numel() // c], dtype=xf.dtype, device=xf.device)
        sums = dist_fn.all_reduce(torch.cat([xf.sum(dim=dims), count]))
        n = sums[c].detach()
        mean = sums[:c] / n
        centred = xf - mean.view(shape)
        var = dist_fn.all_reduce(centred.square().sum(dim=dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / max(float(n) - 1, 1.0), factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class GlobalBatchNorm2d(_GlobalStatistics, nn.BatchNorm2d):
    """Convolutional BN with global statistics (the encoder's)."""


class GlobalBatchNorm1d(_GlobalStatistics, nn.BatchNorm1d):
    """B x C BN with global statistics (ACL's projector)."""


def _to_global(module: nn.Module) -> nn.Module:
    kinds = ((nn.BatchNorm2d, GlobalBatchNorm2d), (nn.BatchNorm1d, GlobalBatchNorm1d))
    glob = next((g for plain, g in kinds if isinstance(module, plain)), None)
    if glob is not None and not isinstance(module, _GlobalStatistics):
        new = glob(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=module.running_mean.device,
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _to_global(child))
    return module


def synchronise_bn(module: nn.Module, dist_: Dist, mode: BNMode) -> nn.Module:
    """`module` with its BatchNorm2d layers made rank-spanning when `mode` is sync and the
    run has several processes; unchanged otherwise. State-dict keys do not change, so
    checkpoints and encoder files stay interchangeable with single-process runs."""
    if mode != "sync" or not dist_.active:
        return module
    if next(module.parameters()).is_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global(module)


class ShuffledKeys:
    """MoCo's shuffle-BN: the key net sees the global batch in a random order, cut across
    the ranks, so a query and its positive key never share BN statistics; the keys come
    back to their images' ranks and order. The permutation comes from the run's generator
    (identical on every rank), so no broadcast is needed."""

    def __init__(self, keys, dist_: Dist) -> None:
        self.keys = keys  # (x, branch) -> B x D embeddings (MoCo.keys)
        self.dist = dist_

    def __call__(self, x: torch.Tensor, branch: str, generator: torch.Generator | None = None) -> torch.Tensor:
        x_all = self.dist.gather(x)
        shard = self.dist.shard(len(x_all))
        perm = torch.randperm(len(x_all), generator=generator, device=x.device)
        k_all = self.dist.gather(self.keys(shard.rows(x_all[perm]), branch))
        unshuffled = torch.empty_like(k_all)
        unshuffled[perm] = k_all
        return shard.rows(unshuffled)
