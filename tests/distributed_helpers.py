"""Workers for tests/distributed/test_distributed.py: one `amoc pretrain` run per rank in processes
that torch.multiprocessing spawns (gloo on the CPU), each reporting what it saw."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from amoc import config
from amoc.checkpoint import CheckpointManager
from amoc.distributed import session
from amoc.pretrain.stage import Pretraining


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    cfg = config.load(params, overrides)
    seen: dict[str, list] = {"losses": [], "local_keys": [], "gathered_keys": [], "saves": []}
    real_save = CheckpointManager.save

    def save(self, epoch, state, step=0):
        seen["saves"].append((epoch, step))
        return real_save(self, epoch, state, step)

    CheckpointManager.save = save
    with session("cpu") as dist:
        pt = Pretraining(cfg, Path(data), Path(out) / f"rank{rank}", dist)
        gather, add = pt.step.gather, pt.log.add

        def recording_gather(keys: torch.Tensor) -> torch.Tensor:
            gathered = gather(keys)
            seen["local_keys"].append(keys.clone())
            seen["gathered_keys"].append(gathered.clone())
            return gathered

        def recording_add(losses: dict, lr: float) -> None:
            seen["losses"].append({k: float(v) for k, v in losses.items()})
            add(losses, lr)

        pt.step.gather, pt.log.add = recording_gather, recording_add
        pt.run()
        state = {k: v.detach().clone() for k, v in pt.model.state_dict().items()}
    torch.save({**seen, "state": state}, Path(report) / f"rank{rank}.pt")


def run_pretrain(world: int, params: Path, overrides: list[str], data: Path, out: Path) -> list[dict]:
    """Each rank's report of a `world`-process pretraining run. One process is spawned too:
    the workers patch CheckpointManager and set torchrun's variables, which must not leak
    into the test process."""
    out.mkdir(parents=True, exist_ok=True)
    args = (world, free_port(), str(params), overrides, str(data), str(out), str(out))
    mp.spawn(pretrain_worker, args=args, nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
