"""Workers for tests/distributed/test_distributed.py: one `amoc pretrain` run per rank in processes
that torch.multiprocessing spawns (gloo on the CPU), each reporting what it saw."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amoc import config
from amoc.checkpoint import CheckpointManager
from amoc.distributed import session
from amoc.pretrain.stage import Pretraining


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _checked(name: str, collective):
    """`collective` that first asserts what NCCL needs and gloo forgives. NCCL copies raw
    bytes: every tensor must be dense in its own layout (NCCL refuses others), which is
    enough where every rank holds the same layout (broadcast, all_reduce); an all_gather
    must send a contiguous tensor into contiguous outputs of its shape and strides (a
    channels_last output beside a contiguous input would receive scrambled pixels)."""

    def call(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        for a in args:
            if isinstance(a, (list, tuple)):
                tensors += [t for t in a if isinstance(t, torch.Tensor)]
        for t in tensors:
            assert _dense(t), f"{name}: a tensor {tuple(t.shape)} with gaps, strides {t.stride()}"
        if name in ("all_gather", "all_gather_into_tensor"):
            for t in tensors:
                assert t.is_contiguous(), f"{name}: a non-contiguous tensor {tuple(t.shape)} strides {t.stride()}"
        if name == "all_gather":
            outputs, sent = args[0], args[1]
            for out in outputs:
                assert (out.shape, out.stride()) == (sent.shape, sent.stride()), (
                    f"all_gather: output {tuple(out.shape)} strides {out.stride()} beside input "
                    f"{tuple(sent.shape)} strides {sent.stride()}"
                )
        CALLS[name] = CALLS.get(name, 0) + 1
        return collective(*args, **kwargs)

    return call


CALLS: dict[str, int] = {}  # collectives seen by the shim in this process, by name


def check_collectives() -> None:
    """Route torch.distributed's collectives through `_checked` in this process."""
    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter"):
        setattr(dist, name, _checked(name, getattr(dist, name)))


def pretrain_worker(
    rank: int, world: int, port: int, params: str, overrides: list[str], data: str, out: str, report: str
) -> None:
    """Run pretraining on this rank with the rank's own output folder (`out`/rank<r>), so
    the test can see which rank wrote what; save the losses of every step, the keys that
    entered the queues (this rank's and the gathered ones), the saves it made and the
    final model state to `report`/rank<r>.pt."""
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    check_collectives()
    cfg = config.load(params, overrides)
    seen: dict[str, list] = {"losses": [], "local_keys": [], "gathered_keys": [], "saves": []}
    real_save = CheckpointManager.save

    def save(self, epoch, state, step=0):
        seen["saves"].append((epoch, step))
        return real_save(self, epoch, state, step)

    CheckpointManager.save = save
    with session("cpu") as dist:
        pt = Pretraining(cfg, Path(data), Path(out) / f"rank{rank}", dist)
        gather, add = getattr(pt.step, "gather", None), pt.log.add  # AMOC's queue gather

        def recording_gather(keys: torch.Tensor) -> torch.Tensor:
            gathered = gather(keys)
            seen["local_keys"].append(keys.clone())
            seen["gathered_keys"].append(gathered.clone())
            return gathered

        def recording_add(losses: dict, lr: float) -> None:
            seen["losses"].append({k: float(v) for k, v in losses.items()})
            add(losses, lr)

        pt.log.add = recording_add
        if gather is not None:
            pt.step.gather = recording_gather
        pt.run()
        state = {k: v.detach().clone() for k, v in pt.model.state_dict().items()}
    torch.save({**seen, "state": state, "collectives": dict(CALLS)}, Path(report) / f"rank{rank}.pt")


def run_pretrain(world: int, params: Path, overrides: list[str], data: Path, out: Path) -> list[dict]:
    """Each rank's report of a `world`-process pretraining run. One process is spawned too:
    the workers patch CheckpointManager and set torchrun's variables, which must not leak
    into the test process."""
    out.mkdir(parents=True, exist_ok=True)
    args = (world, free_port(), str(params), overrides, str(data), str(out), str(out))
    mp.spawn(pretrain_worker, args=args, nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
