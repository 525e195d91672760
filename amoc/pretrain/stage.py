"""`amoc pretrain`: robust self-supervised pre-training of an encoder with the method of
`pretrain.method` (AMOC by default, docs/pretrain.md; ACL, RoCL, DynACL: docs/methods.md). The
method (amoc.pretrain.methods) gives the model, optimiser, step and augmentation; this
stage owns the data, the epochs and learning-rate schedule, resume, DDP, the k-NN
monitor and the outputs.

Outputs in ``--out``: encoder.pt (nets.store format), metrics.json (the headline: k-NN
accuracy, the random-init encoder's k-NN accuracy, the final loss), summary.json (what
ran and how fast; the random-init k-NN with BN statistics of the training views), log.csv
(one row per epoch, rewritten atomically) and checkpoints/ (every ``checkpoint_every``
epochs, at the end, and when SIGINT/SIGTERM stops the run). ``--resume`` continues
from the newest good checkpoint written by the same config; the resumed run ends with
the same weights, bit for bit on the CPU, as one that was never interrupted: the
epoch's image order is a function of (seed, epoch) and every other random number
comes from generators whose states the checkpoint holds.

Under ``torchrun --nproc_per_node N`` the stage runs data-parallel (amoc.distributed):
pretrain.batch_size is the global batch, DDP averages the gradients, AMOC's keys of all
ranks enter every rank's queues in rank order (ACL, RoCL and DynACL gather every rank's
embeddings as in-batch negatives), BN follows distributed.bn, and rank 0 writes every
file. A checkpoint resumes under any world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from amoc.checkpoint import CheckpointManager, fingerprint, rng_state, set_rng_state
from amoc.config import METHOD_NAMES, Config, to_dict
from amoc.data.prepared import load_split, load_stats
from amoc.distributed import Dist, session
from amoc.errors import ConfigError, DataError
from amoc.io import RunLock, write_json
from amoc.nets.store import save_encoder
from amoc.pretrain.augment import SimCLRAugment
from amoc.pretrain.knn import knn_accuracy, training_statistics
from amoc.pretrain.log import EpochLog
from amoc.pretrain.methods import AMOC_ONLY, method_params
from amoc.pretrain.methods import build as build_method
from amoc.runtime import Runtime, setup
from amoc.schedule import set_lr, warmup_cosine
from amoc.stopping import check_finite_params
from amoc.training.loop import Job, Loop

COLLAPSE_TOLERANCE = 0.02  # nats: an epoch's mean L_clean this close to log(K+1) has learnt nothing
OUTPUTS = ("encoder.pt", "metrics.json", "summary.json", "log.csv")


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
        raise DataError(
            f"{folder}: {n} training images are fewer than one batch (pretrain.batch_size={batch_size}); "
            f"lower it, e.g. --set pretrain.batch_size={_pow2_below(n)}, or prepare more data"
        )
    return Data(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device), stats)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _pow2_below(n: int) -> int:
    return max(2, 1 << (max(n, 2).bit_length() - 1))


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The image order of an epoch: a permutation that depends on (seed, epoch) only,
    so a run resumed mid-epoch replays it without storing it. Drawn on the CPU whatever
    the run's device: the same order on every device (the caller moves it)."""
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]  # well-spread 64-bit seed
    generator = torch.Generator(device="cpu").manual_seed(int(mixed))
    return torch.randperm(n, generator=generator, device="cpu")


def run_fingerprint(cfg: Config, rt: Runtime, stats: dict[str, Any]) -> str:
    """Everything that changes the numbers a resumed run would produce: the params the
    method reads (not another method's), the data, the seed and how it computes."""
    return fingerprint(
        method_params(cfg),
        cfg.seed,
        stats,
        rt.device.type,
        str(rt.amp_dtype),
        str(rt.attack_amp_dtype),
        rt.channels_last,
        rt.compile,
        to_dict(cfg.distributed),
    )


def run(cfg: Config, args: Any) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    if cfg.pretrain.from_encoder.path:  # a released encoder instead of training (docs/import.md)
        from amoc.pretrain.imported import pretrain_from_file

        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun one process imports
            pretrain_from_file(cfg, Path(args.data), out)
        return 0
    with session(cfg.runtime.device) as dist:
        with RunLock(out) if dist.main else contextlib.nullcontext():
            metrics = Pretraining(cfg, Path(args.data), out, dist).run(resume=args.resume)
    if not dist.main:
        return 0
    name = cfg.variant if cfg.pretrain.method == "amoc" else METHOD_NAMES[cfg.pretrain.method]
    print(
        f"amoc pretrain: {name}, {metrics['epochs']} epochs, k-NN accuracy {metrics['knn_acc']:.4f} "
        f"(random-init encoder {metrics['knn_random_acc']:.4f}, {_fmt(metrics.get('knn_random_bn_acc'))} with the "
        f"training views' BN statistics; {metrics['knn_bn_branch']} BN), final loss "
        f"{metrics['loss']:.3f} ({metrics['chance_label']} = {metrics['chance_loss']:.3f}), "
        f"{metrics['images_per_s']:.1f} images/s -> {out} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


class Pretraining(Job):
    """The stage's state (data, model, optimiser, generator, log) and what one step and
    one epoch do; `run` hands it to the shared resumable loop (amoc.training)."""

    desc = "pretrain"
    batch_key = "pretrain.batch_size"
    sync_every = 50  # steps between host syncs (progress bar and NaN check)

    def __init__(self, cfg: Config, data: Path, out: Path, dist: Dist = Dist()) -> None:
        self.cfg, self.out, self.dist = cfg, out, dist
        p = cfg.pretrain
        if p.batch_size % dist.world:
            raise ConfigError(
                f"pretrain.batch_size: the global batch of {p.batch_size} does not split evenly over "
                f"{dist.world} processes; use a multiple of {dist.world}"
            )
        self.epochs, self.batch_size = p.epochs, p.batch_size
        self.rt = rt = setup(cfg.runtime, cfg.seed, dist, stage="pretrain")
        if p.method != "amoc" and dist.main:
            print(
                f"amoc pretrain: method {p.method}: {', '.join(AMOC_ONLY)} and model.hidden_dim/feature_dim/"
                f"temperature/key_momentum are AMOC's and ignored; its settings are pretrain.{p.method}",
                flush=True,
            )
        self.data = load_data(data, rt.device, p.batch_size)
        self.steps_per_epoch = len(self.data.train_x) // p.batch_size  # the incomplete last batch is dropped
        self.method = method = build_method(cfg, self.data.stats, rt, dist)
        self.model, self.optimizer, self.step = method.model, method.optimizer, method.step
        self.base_lr = method.base_lr  # the schedule's peak
        # Holds no tensors: it works on the device of the images it is given.
        self.augment = SimCLRAugment(method.augment, size=self.data.train_x.shape[-1])
        self.generator = rt.generator(cfg.seed)  # augmentation and attack noise
        self.checkpoints = CheckpointManager(out / "checkpoints", run_fingerprint(cfg, rt, self.data.stats))
        self.log = EpochLog(out / "log.csv" if dist.main else None, has_adv_loss=method.has_adv_loss, dist=dist)
        self.order: torch.Tensor | None = None  # the current epoch's image order
        self.lr = 0.0
        self.clock = (0, time.perf_counter())  # (steps done, time) at the last sync, for images/s
        self.knn_random: float | None = None  # k-NN accuracy of the encoder before training
        self.knn_random_bn: float | None = None  # the same with BN statistics of the training views

    def run(self, resume: bool = False) -> dict[str, Any]:
        Loop(self, self.checkpoints, self.dist, progress=self.rt.progress).run(resume)
        return self.finish()

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        self.log.check_finite(epoch=self.log_epoch, step=self.log.count)  # never checkpoint a NaN
        check_finite_params(self.model, epoch=self.log_epoch)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "log": self.log.state(),
            "rng": rng_state(self.generator),
            "knn_random": self.knn_random,
            "knn_random_bn": self.knn_random_bn,
        }

    def load_state(self, blob: dict[str, Any]) -> None:
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.log.load_state(blob["log"], self.rt.device)
        set_rng_state(blob["rng"], self.generator)
        self.knn_random = blob.get("knn_random")
        self.knn_random_bn = blob.get("knn_random_bn")  # None in checkpoints older than it

    def fresh(self) -> None:
        for name in OUTPUTS:
            (self.out / name).unlink(missing_ok=True)

    def started(self) -> None:
        self.dist.broadcast_state(self.model)  # every rank starts from rank 0's weights
        if self.knn_random is None:  # a fresh start on every rank (a checkpoint holds rank 0's value)
            # the baselines k-NN must beat: the same encoder at its random initialisation
            # (amoc.pretrain.knn), as it is and with BN statistics of the training views
            if self.dist.main:
                self.knn_random = self.knn()
            with training_statistics(self.method.encoder, self.baseline_views(), self.method.bn_branch, self.rt):
                if self.dist.main:
                    self.knn_random_bn = self.knn()

    @property
    def log_epoch(self) -> int:
        """Epochs finished so far (the log's rows), for messages."""
        return len(self.log.rows)

    # ------------------------------------------------------------------ one epoch
    def steps_in_epoch(self) -> int:
        return self.steps_per_epoch

    def begin_epoch(self, epoch: int, step: int) -> None:
        self.order = epoch_order(self.cfg.seed, epoch, len(self.data.train_x)).to(self.rt.device)
        if self.method.begin_epoch is not None:  # the method's per-epoch schedules (DynACL)
            augment = self.method.begin_epoch(epoch)
            if augment != self.augment.cfg:  # this epoch's views are drawn differently
                self.augment = SimCLRAugment(augment, size=self.data.train_x.shape[-1])
        self.clock = (epoch * self.steps_per_epoch + step, time.perf_counter())

    def train_step(self, epoch: int, step: int) -> None:
        p, rt, dist = self.cfg.pretrain, self.rt, self.dist
        shard = dist.shard(p.batch_size)  # this rank's rows of every global batch
        images = self.data.train_x[shard.rows(self.order[step * p.batch_size : (step + 1) * p.batch_size])]
        x_query = rt.images(self.augment(images, generator=self.generator, shard=shard))
        x_key = rt.images(self.augment(images, generator=self.generator, shard=shard))
        total = p.epochs * self.steps_per_epoch
        self.lr = warmup_cosine(
            epoch * self.steps_per_epoch + step, total, p.warmup_epochs * self.steps_per_epoch, self.base_lr
        )
        set_lr(self.optimizer, self.lr)
        # this rank's losses; the log adds them over the ranks when it reads them (sync points)
        self.log.add(self.step(x_query, x_key, self.generator), self.lr)

    def sync(self, epoch: int, step: int) -> dict[str, str]:
        self.log.check_finite(epoch=epoch, step=step)  # one host sync
        done, now = epoch * self.steps_per_epoch + step, time.perf_counter()
        images_per_s = (done - self.clock[0]) * self.batch_size / max(now - self.clock[1], 1e-9)
        self.clock = (done, now)
        return {
            **{name: f"{value:.3f}" for name, value in self.log.running().items()},
            "lr": f"{self.lr:.4f}",
            "img_s": f"{images_per_s:.0f}",
        }

    def end_epoch(self, epoch: int, seconds: float) -> bool:
        p = self.cfg.pretrain
        done = epoch + 1
        knn = None
        if ((p.knn_every and done % p.knn_every == 0) or done == p.epochs) and self.dist.main:
            knn = self.knn()  # eval mode, no collectives: the other ranks go on and wait at the next one
        row = self.log.end_epoch(done, images=self.steps_per_epoch * p.batch_size, seconds=seconds, knn_acc=knn)
        chance = self.method.chance  # the loss when the positive looks like every negative
        if done > 1 and self.dist.main and abs(row["loss_clean"] - chance) < COLLAPSE_TOLERANCE:
            hint = "lower model.key_momentum or raise" if self.cfg.pretrain.method == "amoc" else "raise"
            print(
                f"warning: pretrain: epoch {done}'s loss_clean {row['loss_clean']:.3f} sits at "
                f"{self.method.chance_label} = {chance:.3f}, chance level: the encoder cannot tell the positive "
                f"from the negatives; {hint} "
                "pretrain.epochs (docs/results.md, docs/methods.md)",
                file=sys.stderr,
                flush=True,
            )
        return done % p.checkpoint_every == 0 or done == p.epochs

    def baseline_views(self) -> Iterator[torch.Tensor]:
        """One augmented view of every training image, in order, batch by batch, drawn from
        a generator of their own (training's random numbers stay as they were). Every rank
        draws the same views: the BN all-reduces of distributed.bn=sync then see one batch."""
        generator = self.rt.generator(self.cfg.seed)
        for step in range(self.steps_per_epoch):  # full batches, as in training
            images = self.data.train_x[step * self.batch_size : (step + 1) * self.batch_size]
            yield self.rt.images(self.augment(images, generator=generator))

    def knn(self) -> float:
        d = self.data
        return knn_accuracy(
            self.method.encoder,
            (d.train_x, d.train_y),
            (d.test_x, d.test_y),
            k=self.cfg.pretrain.knn_k,
            branch=self.method.bn_branch,
            rt=self.rt,
            num_classes=d.stats.get("num_classes"),
        )

    def finish(self) -> dict[str, Any]:
        """Write encoder.pt, metrics.json (the headline numbers DVC compares) and summary.json
        (what ran, how long); returns the summary."""
        cfg, method = self.cfg, self.method
        last = self.log.rows[-1]
        rows = self.log.rows
        seconds = sum(r["seconds"] for r in rows)
        metrics = {"knn_acc": last["knn_acc"], "knn_random_acc": self.knn_random, "loss": last["loss"]}
        amoc_only = {"variant": None, "queue_size": None, "queue_size_adv": None, "leverage": None}
        settings = {**amoc_only, **method.record}  # AMOC's keys are null for the other methods
        summary = {
            **{k: v for k, v in settings.items() if k != "leverage"},
            "epochs": len(rows),
            **metrics,
            # summary.json only: dvc exp show keeps to about 30 metric columns (issue 19)
            "knn_random_bn_acc": self.knn_random_bn,  # None when resumed from an older checkpoint
            "knn_bn_branch": method.bn_branch,
            "loss_clean": last["loss_clean"],
            "loss_adv": last["loss_adv"] if method.has_adv_loss else None,
            "chance_loss": method.chance,
            "chance_label": method.chance_label,
            "log_k_plus_1": math.log(cfg.queue_size + 1) if cfg.pretrain.method == "amoc" else None,
            "seconds": seconds,
            "images_per_s": len(rows) * self.steps_per_epoch * cfg.pretrain.batch_size / max(seconds, 1e-9),
        }
        extra = {
            "bn_branch": method.bn_branch,
            **settings,
            "epochs": len(rows),
            "seed": cfg.seed,
            "knn_acc": last["knn_acc"],
        }
        if self.dist.main:
            self.log.write()
            save_encoder(self.out / "encoder.pt", method.encoder, extra=extra)
            write_json(self.out / "metrics.json", metrics)
            write_json(self.out / "summary.json", summary)
        return summary
