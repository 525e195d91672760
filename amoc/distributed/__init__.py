"""Data-parallel runs under torchrun: N ranks compute what one process computes.

``torchrun --nproc_per_node N -m amoc pretrain ...`` (or probe / finetune) needs no flag:
a stage opens a :func:`session`, which joins the process group when torchrun's
``WORLD_SIZE`` is above 1 (NCCL on CUDA, one GPU per local rank; gloo on the CPU).

The rules every training stage follows, so that the world size changes the speed of a
run and nothing else (checked against one process in tests/distributed/test_distributed.py):

- ``batch_size`` params are global batches. Rank r trains on its rows of each global
  batch (``Shard.rows``: ``tensor_split`` order), so the epoch's image order is shared.
- Every random number (augmentation, attack starts) is drawn for the whole global
  batch from a generator that is identical on all ranks, and each rank keeps its rows
  (``Shard.sample``). One process draws exactly the same numbers.
- Gradients are averaged by DistributedDataParallel. Each rank sums its own logged
  losses on the device; the sums meet (one all-reduce) only when the log is read: at
  sync points, at the end of an epoch and in a checkpoint. No collective per step.
- Rank 0 alone writes files (log, checkpoints, outputs); every rank reads the same
  checkpoint on ``--resume``, whatever world size wrote it.
- A stop signal is acted on when all ranks agree on it (at the loops' sync points), so
  every rank stops after the same step.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from amoc.errors import AmocError

Draw = Callable[[tuple[int, ...]], torch.Tensor]
# What a collective raises when a peer process is gone (gloo, NCCL)
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


@dataclass(frozen=True)
class Shard:
    """This rank's part of one global batch of `total` samples."""

    rank: int = 0
    world: int = 1
    total: int = 0

    def rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's rows of a global-batch tensor (sizes differ by at most one)."""
        return t if self.world == 1 else t.tensor_split(self.world, dim=dim)[self.rank]

    def sample(self, draw: Draw, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """`draw(shape)` as one process would make it for the whole global batch, cut to this
        rank's rows; `shape` is the local shape (rows first)."""
        if self.world == 1:
            return draw(tuple(shape))
        return self.rows(draw((self.total, *shape[1:])))


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run; Dist() is a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, total: int) -> Shard:
        return Shard(self.rank, self.world, total)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (same shape on all ranks) concatenated along dim 0 in rank order,
        in `t`'s memory format.

        The collective itself moves contiguous tensors only: NCCL copies raw bytes, so a
        channels_last output (``empty_like`` of a channels_last `t`) beside the contiguous
        bytes sent would receive scrambled pixels."""
        if not self.active:
            return t
        sent = t.contiguous()
        parts = [torch.empty_like(sent, memory_format=torch.contiguous_format) for _ in range(self.world)]
        dist.all_gather(parts, sent)
        whole = torch.cat(parts)
        channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
        return whole.contiguous(memory_format=torch.channels_last) if channels_last else whole

    def gather_grad(self, t: torch.Tensor) -> torch.Tensor:
        """`gather` through which gradients flow back to every rank's `t`: the gradient a
        rank receives for its `t` is the sum over the ranks of the gradients of their
        gathered copies. With each rank's loss over its own anchors and every rank's
        keys, that is the gradient of the global batch's loss (in-batch negatives across
        ranks: ACL, RoCL). Keep `t`'s rows equal on every rank."""
        return _GatherGrad.apply(t) if self.active else t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world if self.active else t

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a host sync)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=_collective_device())
        dist.all_reduce(t)
        return bool(t.item())

    def should_stop(self, requested: bool, at_sync_point: bool) -> bool:
        """Whether to act on a stop signal now: at once in a single process; in a
        multi-process run only at the loop's sync points, all ranks together (they stop
        if any rank was signalled), so that every rank stops after the same step."""
        if not self.active:
            return requested
        return at_sync_point and self.any(requested)

    def lost_peer(self, exc: BaseException) -> bool:
        """Whether `exc` is a collective failing because another rank is gone (SIGKILLed,
        crashed, its node lost): torch's DistError, or gloo's and NCCL's plain RuntimeError."""
        return self.active and (isinstance(exc, dist.DistError) or any(s in str(exc) for s in _PEER_LOST))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_state(self, module: nn.Module) -> None:
        """Make every parameter and buffer equal to rank 0's (after a fresh init or a resume)."""
        if self.active:
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)

    def wrap(self, module: nn.Module, *, find_unused_parameters: bool = False) -> nn.Module:
        """`module` under DistributedDataParallel when this is a multi-process run."""
        if not self.active:
            return module
        on_cuda = next(module.parameters()).is_cuda
        return nn.parallel.DistributedDataParallel(
            module,
            device_ids=[torch.cuda.current_device()] if on_cuda else None,
            find_unused_parameters=find_unused_parameters,
        )


class _GatherGrad(torch.autograd.Function):
    """all_gather forward; backward: the summed gradient of every rank's copy of this
    rank's rows (an all_reduce, which gloo and NCCL both have, then this rank's slice)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        sent = t.contiguous()
        parts = [torch.empty_like(sent, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, sent)
        ctx.rows = t.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rank = dist.get_rank()
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows]


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise AmocError(f"{name}={value!r} is not an integer; launch multi-process runs with torchrun") from None


def _attempt_store() -> dist.Store:
    """torchrun's store, under a prefix of its own for each restart of the workers.

    Under `torchrun --max-restarts=N` the restarted workers share one store with the
    workers they replace (the agent's, which lives on), and torch adds no prefix per
    attempt: a restarted rank could read the dead group's addresses (gloo: "connectFullMesh
    failed ... Connection refused") or NCCL id. Measured on 2 gloo ranks: the restart
    failed one time in three, and every time when rank 0 came up 2 s late.
    TORCHELASTIC_RESTART_COUNT keeps each attempt's keys apart."""
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"amoc/attempt{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store)


@contextlib.contextmanager
def session(device: str) -> Iterator[Dist]:
    """Join torchrun's process group for the block when WORLD_SIZE > 1; `device` is
    runtime.device (NCCL and one GPU per local rank unless it says cpu)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield Dist()
        return
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise AmocError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "use torchrun --nproc_per_node <= the GPU count"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", store=_attempt_store(), rank=rank, world_size=world)
    try:
        yield Dist(rank, world, local_rank)
    finally:
        dist.destroy_process_group()
