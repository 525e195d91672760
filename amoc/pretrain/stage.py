"""`amoc pretrain`: AMOC pre-training of the query encoder (spec section 5).

Outputs in ``--out``: encoder.pt (nets.store format), metrics.json, log.csv (one row
per epoch, rewritten atomically) and checkpoints/ (every ``checkpoint_every`` epochs,
at the end, and when SIGINT/SIGTERM stops the run mid-epoch). ``--resume`` continues
from the newest good checkpoint written by the same config; the resumed run ends with
the same weights, bit for bit on the CPU, as one that was never interrupted: the
epoch's image order is a function of (seed, epoch) and every other random number
comes from generators whose states the checkpoint holds.

Under ``torchrun --nproc_per_node N`` the stage runs data-parallel (amoc.distributed):
pretrain.batch_size is the global batch, DDP averages the query net's gradients, the
keys of all ranks enter every rank's queues in rank order, BN follows distributed.bn,
and rank 0 writes every file. A checkpoint resumes under any world size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amoc.checkpoint import CheckpointManager, fingerprint, rng_state, set_rng_state
from amoc.config import Config, to_dict
from amoc.data.prepared import load_split, load_stats
from amoc.distributed import Dist, session
from amoc.distributed.bn import ShuffledKeys, synchronise_bn
from amoc.errors import ConfigError, DataError
from amoc.io import RunLock, write_json
from amoc.nets.store import save_encoder
from amoc.pretrain.attack import ContrastiveAttack
from amoc.pretrain.augment import SimCLRAugment
from amoc.pretrain.knn import knn_accuracy
from amoc.pretrain.log import EpochLog, Progress
from amoc.pretrain.moco import MoCo, QueryPass, build_moco
from amoc.pretrain.step import TrainStep
from amoc.pretrain.variants import Variant
from amoc.runtime import Runtime, oom_hint, setup
from amoc.schedule import scaled_lr, set_lr, warmup_cosine
from amoc.stopping import StopSignals, Stopped, check_finite_params

OUTPUTS = ("encoder.pt", "metrics.json", "log.csv")


@dataclasses.dataclass
class Data:
    train_x: torch.Tensor  # N x 3 x H x W uint8 on the device
    train_y: torch.Tensor  # N int64 (k-NN monitor only)
    test_x: torch.Tensor
    test_y: torch.Tensor
    stats: dict[str, Any]


def load_data(folder: str | Path, device: torch.device, batch_size: int) -> Data:
    stats = load_stats(folder)
    train_x, train_y = load_split(folder, "train")
    test_x, test_y = load_split(folder, "test")
    n = len(train_x)
    if n < batch_size:
        raise DataError(f"{folder}: {n} training images are fewer than one batch (pretrain.batch_size={batch_size}); "
                        f"lower it, e.g. --set pretrain.batch_size={_pow2_below(n)}, or prepare more data")
    return Data(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device), stats)


def _pow2_below(n: int) -> int:
    return max(2, 1 << (max(n, 2).bit_length() - 1))


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The image order of an epoch: a permutation that depends on (seed, epoch) only,
    so a run resumed mid-epoch replays it without storing it."""
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]  # well-spread 64-bit seed
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(mixed)))


def run_fingerprint(cfg: Config, rt: Runtime, stats: dict[str, Any]) -> str:
    """Everything that changes the numbers a resumed run would produce."""
    pretrain = {k: v for k, v in to_dict(cfg.pretrain).items() if k != "checkpoint_every"}
    return fingerprint(cfg.variant, cfg.queue_size, cfg.queue_size_adv, cfg.leverage, cfg.seed,
                       to_dict(cfg.model), pretrain, stats, rt.device.type, str(rt.amp_dtype),
                       rt.channels_last, rt.compile, to_dict(cfg.distributed))


def make_optimizer(model: MoCo, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """SGD on every query-net parameter, weight decay on all of them (the authors' choice:
    BN affine and biases included)."""
    p = cfg.pretrain
    return torch.optim.SGD(model.query.parameters(), lr=base_lr(cfg), momentum=p.momentum, weight_decay=p.weight_decay,
                           fused=True if device.type == "cuda" else None)


def base_lr(cfg: Config) -> float:
    p, d = cfg.pretrain, cfg.distributed
    return scaled_lr(p.lr, p.batch_size, d.lr_scaling, d.reference_batch)


def run(cfg: Config, args: Any) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    with session(cfg.runtime.device) as dist:
        with RunLock(out) if dist.main else contextlib.nullcontext():
            metrics = Pretraining(cfg, Path(args.data), out, dist).run(resume=args.resume)
    if not dist.main:
        return 0
    print(f"amoc pretrain: {cfg.variant}, {metrics['epochs']} epochs, k-NN accuracy {metrics['knn_acc']:.4f} "
          f"({metrics['knn_bn_branch']} BN), {metrics['images_per_s']:.1f} images/s -> {out} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


class Pretraining:
    """The stage's state: data, model, optimiser, generator, log; `run` is the loop."""

    SYNC_EVERY = 50  # steps between host syncs (progress bar and NaN check)

    def __init__(self, cfg: Config, data: Path, out: Path, dist: Dist = Dist()) -> None:
        self.cfg, self.out, self.dist = cfg, out, dist
        p = cfg.pretrain
        if p.batch_size % dist.world:
            raise ConfigError(f"pretrain.batch_size: the global batch of {p.batch_size} does not split evenly over "
                              f"{dist.world} processes; use a multiple of {dist.world}")
        self.variant = Variant.parse(cfg.variant)
        self.rt = rt = setup(cfg.runtime, cfg.seed, dist, stage="pretrain")
        self.data = load_data(data, rt.device, p.batch_size)
        self.steps_per_epoch = len(self.data.train_x) // p.batch_size  # the incomplete last batch is dropped
        self.model = model = rt.prepare(build_moco(cfg, self.data.stats["mean"], self.data.stats["std"])).train()
        model.query = synchronise_bn(model.query, dist, cfg.distributed.bn)
        model.key = synchronise_bn(model.key, dist, cfg.distributed.bn)
        self.optimizer = make_optimizer(model, cfg, rt.device)
        self.base_lr = base_lr(cfg)  # the schedule's peak
        if rt.compile:
            model.query.compile()
            model.key.compile()
        attack = ContrastiveAttack(model, self.variant, p.attack, autocast=rt.autocast, dist=dist)
        # An unused parameter (the query's adv BN when no query is adversarial) must be
        # declared to DDP, or it waits for its gradient forever.
        query_pass = dist.wrap(QueryPass(model), find_unused_parameters=not self.variant.adv_query)
        shuffled = ShuffledKeys(model.keys, dist) if dist.active and cfg.distributed.bn == "shuffle" else None
        self.step = TrainStep(model, self.variant, self.optimizer, attack, leverage=cfg.leverage,
                              enqueue_order=p.enqueue_order, autocast=rt.autocast,
                              query_pass=query_pass, keys=shuffled, gather=dist.gather)
        # Holds no tensors: it works on the device of the images it is given.
        self.augment = SimCLRAugment(p.augment, size=self.data.train_x.shape[-1])
        self.generator = rt.generator(cfg.seed)  # augmentation and attack noise
        self.checkpoints = CheckpointManager(out / "checkpoints", run_fingerprint(cfg, rt, self.data.stats))
        self.log = EpochLog(out / "log.csv" if dist.main else None, has_adv_loss=self.variant.has_adv_loss)
        self.epoch, self.step_in_epoch = 0, 0  # position: next step to run
        self.seconds = 0.0  # training time of the current epoch so far

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "seconds": self.seconds, "log": self.log.state(), "rng": rng_state(self.generator)}

    def save(self) -> Path:
        """A checkpoint at the current position: after `epoch` whole epochs plus
        `step_in_epoch` steps of the next one (0 at an epoch boundary)."""
        self.log.check_finite(epoch=self.epoch, step=self.step_in_epoch)  # never checkpoint a NaN
        check_finite_params(self.model.query, epoch=self.epoch)
        if not self.dist.main:  # the ranks hold the same state; rank 0 writes it
            return self.checkpoints.path(self.epoch, self.step_in_epoch)
        return self.checkpoints.save(self.epoch, self.state(), step=self.step_in_epoch)

    def restore(self) -> bool:
        blob = self.checkpoints.load_latest()
        if blob is None:
            return False
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.epoch, self.step_in_epoch = blob["epoch"], blob["step"]
        self.seconds = blob["seconds"]
        self.log.load_state(blob["log"], self.rt.device)
        set_rng_state(blob["rng"], self.generator)
        return True

    def _start(self, resume: bool) -> None:
        self._open(resume)
        self.dist.barrier()  # rank 0 has cleared stale files or every rank has read the checkpoint
        self.dist.broadcast_state(self.model)

    def _open(self, resume: bool) -> None:
        if resume and self.restore():
            if self.dist.main:
                print(f"amoc pretrain: resuming at epoch {self.epoch + 1}, step {self.step_in_epoch} "
                      f"from {self.checkpoints.folder}", file=sys.stderr)
            return
        if not self.dist.main:
            return
        if resume:
            print(f"amoc pretrain: note: no usable checkpoint in {self.checkpoints.folder}; starting fresh",
                  file=sys.stderr)
        # A fresh run: drop what an earlier run left, so a later --resume or a reader
        # never mixes the two.
        self.checkpoints.clear()
        for name in OUTPUTS:
            (self.out / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> dict[str, Any]:
        p = self.cfg.pretrain
        self._start(resume)
        total = p.epochs * self.steps_per_epoch
        progress = Progress(total, self.epoch * self.steps_per_epoch + self.step_in_epoch, p.batch_size,
                            enabled=self.rt.progress and self.dist.main)
        with StopSignals() as signals, progress, oom_hint("pretrain", "pretrain.batch_size", p.batch_size):
            while self.epoch < p.epochs:
                self.train_epoch(signals, progress)
                self.end_epoch()
        return self.finish()

    def train_epoch(self, signals: StopSignals, progress: Progress) -> None:
        p, rt, dist = self.cfg.pretrain, self.rt, self.dist
        order = epoch_order(self.cfg.seed, self.epoch, len(self.data.train_x)).to(rt.device)
        shard = dist.shard(p.batch_size)  # this rank's rows of every global batch
        warmup = p.warmup_epochs * self.steps_per_epoch
        total = p.epochs * self.steps_per_epoch
        tick = time.perf_counter()
        progress.restart(self.epoch * self.steps_per_epoch + self.step_in_epoch)
        while self.step_in_epoch < self.steps_per_epoch:
            step = self.step_in_epoch
            images = self.data.train_x[shard.rows(order[step * p.batch_size:(step + 1) * p.batch_size])]
            x_query = rt.images(self.augment(images, generator=self.generator, shard=shard))
            x_key = rt.images(self.augment(images, generator=self.generator, shard=shard))
            lr = warmup_cosine(self.epoch * self.steps_per_epoch + step, total, warmup, self.base_lr)
            set_lr(self.optimizer, lr)
            losses = self.step(x_query, x_key, self.generator)
            if dist.active:  # the global batch's mean losses, as one process would log them
                losses = dict(zip(losses, dist.mean(torch.stack(list(losses.values())))))
            self.log.add(losses, lr)
            self.step_in_epoch += 1
            synced = self.step_in_epoch % self.SYNC_EVERY == 0 or self.step_in_epoch == self.steps_per_epoch
            if synced:
                self.log.check_finite(epoch=self.epoch, step=self.step_in_epoch)  # one host sync
                progress.update(self.step_in_epoch + self.epoch * self.steps_per_epoch, self.log, lr)
            if self.dist.should_stop(bool(signals.requested), synced):
                self.seconds += time.perf_counter() - tick
                path = self.save()
                raise Stopped(f"{signals.requested or 'a stop signal'} received: stopped at epoch {self.epoch + 1}, step "
                              f"{self.step_in_epoch}; checkpoint {path}. Continue with the same command plus --resume")
        self.seconds += time.perf_counter() - tick

    def end_epoch(self) -> None:
        p = self.cfg.pretrain
        self.epoch += 1
        knn = None
        if ((p.knn_every and self.epoch % p.knn_every == 0) or self.epoch == p.epochs) and self.dist.main:
            knn = self.knn()  # eval mode, no collectives: the other ranks go on and wait at the next one
        self.log.end_epoch(self.epoch, images=self.steps_per_epoch * p.batch_size, seconds=self.seconds, knn_acc=knn)
        self.step_in_epoch, self.seconds = 0, 0.0
        if self.epoch % p.checkpoint_every == 0 or self.epoch == p.epochs:
            self.save()

    def knn(self) -> float:
        d = self.data
        return knn_accuracy(self.model.encoder, (d.train_x, d.train_y), (d.test_x, d.test_y), k=self.cfg.pretrain.knn_k,
                            branch=self.variant.encoder_bn_branch, rt=self.rt, num_classes=d.stats.get("num_classes"))

    def finish(self) -> dict[str, Any]:
        cfg, v = self.cfg, self.variant
        last = self.log.rows[-1]
        rows = self.log.rows
        seconds = sum(r["seconds"] for r in rows)
        metrics = {
            "variant": v.name, "queue_size": cfg.queue_size, "queue_size_adv": cfg.queue_size_adv,
            "epochs": len(rows), "knn_acc": last["knn_acc"], "knn_bn_branch": v.encoder_bn_branch,
            "loss": last["loss"], "loss_clean": last["loss_clean"],
            "seconds": seconds, "images_per_s": len(rows) * self.steps_per_epoch * cfg.pretrain.batch_size / max(seconds, 1e-9),
        }
        if v.has_adv_loss:
            metrics["loss_adv"] = last["loss_adv"]
        extra = {"bn_branch": v.encoder_bn_branch, "variant": v.name, "queue_size": cfg.queue_size,
                 "queue_size_adv": cfg.queue_size_adv, "epochs": len(rows), "seed": cfg.seed,
                 "leverage": cfg.leverage, "knn_acc": last["knn_acc"]}
        if self.dist.main:
            self.log.write()
            save_encoder(self.out / "encoder.pt", self.model.encoder, extra=extra)
            write_json(self.out / "metrics.json", metrics)
        return metrics
