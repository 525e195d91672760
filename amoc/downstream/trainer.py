"""Classifier training for `amoc probe` and `amoc finetune`, on the shared resumable loop
(amoc.training.loop).

One epoch: a seeded permutation of the uint8 train set (kept on the device), per-sample
crop + flip on the device, then per batch the loss of the protocol (CE, TRADES or
PGD-AT; attacks run with the model in eval mode) and an SGD step. The learning rate is
`schedule.multistep` of the epoch. After every epoch: a row in log.csv and a checkpoint.
SIGINT/SIGTERM finish the current step, save a mid-epoch checkpoint and raise `Stopped`;
`--resume` continues bit-identically on the CPU (all randomness flows through one
generator whose state is checkpointed with the weights, the optimiser and the epoch's
permutation).

Under torchrun the loop runs data-parallel as pre-training does (amoc.distributed):
batch_size is global, each rank trains on its rows of every batch with the random
numbers of the global batch, DDP averages the gradients (the loss is weighted by the
rank's share, so uneven splits of the last batch still give the global mean), BN of a
fine-tuned encoder follows distributed.bn (shuffle = local: there is no key net), and
rank 0 writes every file. A last batch with fewer images than ranks is skipped.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from amoc import io
from amoc.attacks.accuracy import correct, percent
from amoc.attacks.ce import ce_pgd
from amoc.checkpoint import CheckpointManager, fingerprint, rng_state, set_rng_state
from amoc.config import AttackConfig, Config
from amoc.data.prepared import load_split, load_stats
from amoc.data.splits import validation_split
from amoc.distributed import Dist, Shard
from amoc.distributed.bn import synchronise_bn
from amoc.downstream.augment import crop_flip
from amoc.downstream.losses import TradesStart, trades_attack, trades_loss
from amoc.errors import ConfigError, DataError
from amoc.io import file_digest
from amoc.nets.classifier import Classifier, save_classifier
from amoc.runtime import Runtime, eval_mode
from amoc.schedule import multistep, scaled_lr, set_lr
from amoc.stopping import check_finite, check_finite_params
from amoc.training.hot import freeze_unused_bn, hot
from amoc.training.loop import Job, Loop
from amoc.version import __version__

LossName = Literal["ce", "trades", "pgd_at"]
LOG_COLUMNS = ("epoch", "loss", "train_acc", "train_adv_acc", "val_acc", "val_pgd_acc", "lr", "seconds", "images_per_s")
FINITE_EVERY = 10  # steps between NaN checks (each costs one host sync)


@dataclass(frozen=True)
class TrainSpec:
    """What the loop needs, whichever params section (probe / finetune) it came from."""

    loss: LossName
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    milestones: tuple[int, ...]
    lr_gamma: float
    beta: float
    trades_start: TradesStart
    attack: AttackConfig
    val_images: int
    section: str = "finetune"  # the params section, for error messages ("probe.batch_size")

    @classmethod
    def from_section(cls, section: Any, *, name: str, loss: LossName, weight_decay: float, cfg: Config) -> "TrainSpec":
        """`cfg` supplies the learning-rate scaling rule (distributed.lr_scaling)."""
        d = cfg.distributed
        lr = scaled_lr(section.lr, section.batch_size, d.lr_scaling, d.reference_batch)
        return cls(
            loss=loss,
            epochs=section.epochs,
            batch_size=section.batch_size,
            lr=lr,
            momentum=section.momentum,
            weight_decay=weight_decay,
            milestones=tuple(section.milestones),
            lr_gamma=section.lr_gamma,
            beta=section.beta,
            trades_start=section.trades_start,
            attack=section.attack,
            val_images=section.val_images,
            section=name,
        )


class Forwards(nn.Module):
    """The model's training forwards of one step in one call (TRADES needs two), so that
    DistributedDataParallel sees one forward per backward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(x) for x in xs)


def loss_step(
    model: nn.Module,
    spec: TrainSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    rt: Runtime,
    generator: torch.Generator,
    forwards: nn.Module | None = None,
    shard: Shard = Shard(),
    attack_model: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, logits on clean x or None, logits on x_adv or None) for one batch. The
    attacks run on `attack_model` (default `model`; the two differ only in being compiled,
    amoc.training.hot) with `model` in eval mode; the trained forwards go through `forwards`
    (Forwards(model), under DDP in a multi-process run)."""
    forwards = forwards or Forwards(model)
    attacked = attack_model or model
    if spec.loss == "ce":
        with rt.autocast():
            (logits,) = forwards(x)
        return F.cross_entropy(logits.float(), y), logits, None
    with eval_mode(model), rt.attack_autocast():  # attacks use running BN statistics
        if spec.loss == "trades":
            x_adv = trades_attack(attacked, x, spec.attack, generator, shard=shard, start=spec.trades_start)
        else:
            x_adv = ce_pgd(attacked, x, y, spec.attack, generator, shard=shard)
    with rt.autocast():
        if spec.loss == "pgd_at":
            (logits_adv,) = forwards(x_adv)
            return F.cross_entropy(logits_adv.float(), y), None, logits_adv
        logits_adv, logits_nat = forwards(x_adv, x)
    return trades_loss(logits_nat, logits_adv, y, spec.beta), logits_nat, logits_adv


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    lines = [",".join(LOG_COLUMNS)]
    for row in rows:
        lines.append(",".join("" if row.get(c) is None else str(row[c]) for c in LOG_COLUMNS))
    io.write_text(path, "\n".join(lines) + "\n")


class ClassifierTraining(Job):
    """Training `trainable`'s parameters (part or all of `model`) on uint8 images x
    (N x C x H x W) and labels y, one epoch = one seeded permutation of the train set in
    batches; `run` hands it to the shared resumable loop (amoc.training).

    `train_mode` False keeps the whole model in eval mode (linear probes: frozen BN
    statistics). Writes out/log.csv and out/checkpoints/. `dist` and `bn`
    (distributed.bn): a multi-process run, see the module's docstring."""

    sync_every = FINITE_EVERY

    def __init__(
        self,
        model: nn.Module,
        trainable: nn.Module,
        spec: TrainSpec,
        x: torch.Tensor,
        y: torch.Tensor,
        rt: Runtime,
        out: str | os.PathLike,
        *,
        seed: int,
        fingerprint: str,
        train_mode: bool,
        desc: str,
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
        dist: Dist = Dist(),
        bn: str = "sync",
    ) -> None:
        self.model, self.trainable, self.spec, self.rt, self.dist = model, trainable, spec, rt, dist
        self.out, self.desc, self.train_mode = Path(out), desc, train_mode
        self.epochs, self.batch_size, self.batch_key = spec.epochs, spec.batch_size, f"{spec.section}.batch_size"
        self.x, self.y = x.to(rt.device), y.to(rt.device)
        self.n = self.x.shape[0]
        if train_mode:
            synchronise_bn(model, dist, bn)  # in place: the model's modules are what gets trained
        params = [p for p in trainable.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
        self.generator = rt.generator(seed)
        self.checkpoints = CheckpointManager(self.out / "checkpoints", fingerprint)
        self.rows: list[dict[str, Any]] = []
        self.perm: torch.Tensor | None = None  # the epoch's permutation, drawn when the epoch starts
        self.partial: dict[str, Any] | None = None  # a resumed epoch's totals so far
        self.lr = 0.0
        self.seed, self.val = seed, val  # held-out (uint8 images, labels), or None
        self.best: dict[str, Any] | None = None  # the best epoch on `val` so far: epoch, score, state
        model.train(train_mode)
        if train_mode and hasattr(model, "bn_branch"):
            # A fine-tuned encoder runs one BN branch only. Frozen (after the optimiser took
            # them, as before: SGD skips parameters without a gradient, so the weights and the
            # optimiser's checkpoint state stay as they were), the other branch's parameters
            # leave DDP no unused parameter to search the autograd graph for every step.
            freeze_unused_bn(model, model.bn_branch)
        self.forwards_eager = dist.wrap(Forwards(model))
        # runtime.compile: the training forwards and the attacks' forward are the per-step
        # work, each compiled for the shape of a full batch (amoc.training.hot); a smaller
        # last batch and validation run the eager module, so they never compile.
        self.forwards = hot(self.forwards_eager, rt, "train_forwards")
        self.attack_model = hot(model, rt, "attack")

    def run(self, resume: bool) -> dict[str, Any]:
        Loop(self, self.checkpoints, self.dist, progress=self.rt.progress).run(resume)
        if self.dist.main:
            _write_log(self.out / "log.csv", self.rows)
        last = self.rows[-1]
        total = sum(float(r["seconds"]) for r in self.rows)
        return {
            "epochs": len(self.rows),
            "train_loss": float(last["loss"]),
            "train_acc": float(last["train_acc"]),
            "train_adv_acc": None if last["train_adv_acc"] is None else float(last["train_adv_acc"]),
            "seconds": round(total, 3),
            "images_per_s": round(len(self.rows) * self.n / max(total, 1e-9), 1),
            "n_train": self.n,
            "n_val": 0 if self.val is None else len(self.val[1]),
            "loss_fn": self.spec.loss,
            "spec": dataclasses.asdict(self.spec),
        }

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        mid_epoch = self.perm is not None
        partial = None
        if mid_epoch:  # this epoch's totals over every rank (collectives: all ranks run this)
            total = self.dist.sum(self.loss_sum)
            check_finite({"loss": total}, epoch=len(self.rows) + 1, step=self.step)
            partial = {
                "loss_sum": total.item(),
                "correct": int(self.dist.sum(self.correct)),
                "adv_correct": int(self.dist.sum(self.adv_correct)),
                "seen": self.seen,
            }
        return {
            "model": {k: v.detach().cpu() for k, v in self.trainable.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.generator),
            "perm": self.perm.cpu() if mid_epoch else None,
            "partial": partial,
            "rows": self.rows,
            "best": self.best,
        }

    def load_state(self, blob: dict[str, Any]) -> None:
        self.trainable.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        set_rng_state(blob["rng"], self.generator)
        self.rows = list(blob["rows"])
        self.best = blob.get("best")
        if blob["step"]:
            self.perm, self.partial = blob["perm"].to(self.rt.device), blob["partial"]

    # ------------------------------------------------------------------ one epoch
    def steps_in_epoch(self) -> int:
        # a last batch with fewer images than ranks is skipped (every rank needs a row)
        return sum(
            1 for start in range(0, self.n, self.batch_size) if min(self.batch_size, self.n - start) >= self.dist.world
        )

    def begin_epoch(self, epoch: int, step: int) -> None:
        spec, device = self.spec, self.rt.device
        self.lr = multistep(epoch, spec.lr, spec.milestones, spec.lr_gamma)
        set_lr(self.optimizer, self.lr)
        if step == 0:
            self.perm = torch.randperm(self.n, generator=self.generator, device=device)
            self.partial = None
        self.batches = [b for b in torch.split(self.perm, spec.batch_size) if len(b) >= self.dist.world]
        # device-side accumulators of this rank's images (rank 0 carries a resumed epoch's
        # totals): no host sync per step; summed over the ranks when read
        carried = (
            self.partial if (self.partial and self.dist.main) else {"loss_sum": 0.0, "correct": 0, "adv_correct": 0}
        )
        self.loss_sum = torch.tensor(carried["loss_sum"], dtype=torch.float64, device=device)
        self.correct = torch.tensor(carried["correct"], dtype=torch.int64, device=device)
        self.adv_correct = torch.tensor(carried["adv_correct"], dtype=torch.int64, device=device)
        self.seen = self.partial["seen"] if self.partial else 0  # images of the global batches so far
        self.step = step

    def train_step(self, epoch: int, step: int) -> None:
        rt, dist = self.rt, self.dist
        shard = dist.shard(len(self.batches[step]))
        idx = shard.rows(self.batches[step])
        xb = rt.images(crop_flip(self.x[idx], self.generator, shard=shard))
        yb = self.y[idx]
        # the epoch's first batch is a full one: any other size (a partial last batch) runs
        # eager rather than compiling the hot path again for one step an epoch
        full = len(self.batches[step]) == len(self.batches[0])
        forwards, attacked = (self.forwards, self.attack_model) if full else (self.forwards_eager, self.model)
        loss, logits, logits_adv = loss_step(
            self.model, self.spec, xb, yb, rt, self.generator, forwards, shard, attack_model=attacked
        )
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages over the ranks: weight each rank's mean by its share of the batch
        (loss * (len(idx) * dist.world / shard.total) if dist.active else loss).backward()
        self.optimizer.step()
        with torch.no_grad():
            self.loss_sum += loss.detach().double() * len(idx)
            if logits is not None:
                self.correct += (logits.argmax(1) == yb).sum()
            if logits_adv is not None:
                self.adv_correct += (logits_adv.argmax(1) == yb).sum()
        self.seen += shard.total
        self.step = step + 1

    def sync(self, epoch: int, step: int) -> dict[str, str]:
        total = self.dist.sum(self.loss_sum)
        check_finite({"loss": total}, epoch=epoch + 1, step=step)
        return {"loss": f"{total.item() / self.seen:.4f}", "lr": f"{self.lr:g}"}

    def end_epoch(self, epoch: int, seconds: float) -> bool:
        spec, dist = self.spec, self.dist
        loss_sum, correct, adv_correct = dist.sum(self.loss_sum), dist.sum(self.correct), dist.sum(self.adv_correct)
        check_finite_params(self.trainable, epoch=epoch + 1)
        seen = self.seen
        clean_acc = 100 * int(correct) / seen if spec.loss != "pgd_at" else None
        adv_acc = 100 * int(adv_correct) / seen if spec.loss != "ce" else None
        val_acc, val_pgd_acc = self.validate(epoch) if self.val is not None and dist.main else (None, None)
        row = {
            "epoch": epoch + 1,
            "loss": f"{loss_sum.item() / seen:.6f}",
            # train_acc: on the examples the loss is about (adversarial ones for PGD-AT)
            "train_acc": f"{clean_acc if clean_acc is not None else adv_acc:.4f}",
            "train_adv_acc": None if adv_acc is None else f"{adv_acc:.4f}",
            "val_acc": None if val_acc is None else f"{val_acc:.4f}",
            "val_pgd_acc": None if val_pgd_acc is None else f"{val_pgd_acc:.4f}",
            "lr": f"{self.lr:.6g}",
            "seconds": f"{seconds:.3f}",
            "images_per_s": f"{seen / max(seconds, 1e-9):.1f}",
        }
        self.rows.append(row)
        self.perm, self.partial = None, None
        if dist.main:
            _write_log(self.out / "log.csv", self.rows)
            print(
                f"{self.desc} epoch {epoch + 1}/{spec.epochs}: loss {row['loss']}, train_acc "
                f"{float(row['train_acc']):.2f}%"
                + (f", train_adv_acc {float(row['train_adv_acc']):.2f}%" if row["train_adv_acc"] else "")
                + (f", val {val_acc:.2f}% / PGD {val_pgd_acc:.2f}%" if val_acc is not None else "")
                + f", lr {self.lr:g}, {seconds:.1f} s, {row['images_per_s']} images/s",
                flush=True,
            )
        return True  # a checkpoint after every epoch

    # ------------------------------------------------------------------ validation
    @property
    def selected_by(self) -> str:
        """What picks the best epoch: clean accuracy for SLF, PGD accuracy for the robust heads."""
        return "val_acc" if self.spec.loss == "ce" else "val_pgd_acc"

    def validate(self, epoch: int) -> tuple[float, float]:
        """Clean and PGD accuracy (%) on the held-out images, in eval mode and fp32, after
        `epoch`; keeps the best epoch's weights. PGD is the training attack on the cross-
        entropy, robust = correct clean and attacked, its random start drawn from the same
        seed every epoch, so that epochs are compared on the same numbers."""
        xv, yv = self.val
        model, rt, bs = self.model, self.rt, self.spec.batch_size
        generator = rt.generator(self.seed)
        with eval_mode(model):
            clean = correct(model, xv, yv, rt, bs)
            robust = clean & correct(
                model, xv, yv, rt, bs, lambda xb, yb: ce_pgd(model, xb, yb, self.spec.attack, generator)
            )
        val_acc, val_pgd_acc = percent(clean), percent(robust)
        score = val_acc if self.selected_by == "val_acc" else val_pgd_acc
        if self.best is None or score > self.best["score"]:  # ties keep the earlier epoch
            self.best = {
                "epoch": epoch + 1,
                "score": score,
                "val_acc": val_acc,
                "val_pgd_acc": val_pgd_acc,
                "state": {k: v.detach().cpu().clone() for k, v in self.trainable.state_dict().items()},
            }
        return val_acc, val_pgd_acc


def load_train_data(folder: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(uint8 images, labels, stats) of the prepared train split, labels checked."""
    x, y = load_split(folder, "train")
    stats = load_stats(folder)
    num_classes = stats.get("num_classes")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise DataError(
            f"{Path(folder) / 'stats.json'}: num_classes {num_classes!r} is not a class count >= 2; rerun `amoc "
            "download`"
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"{folder}: train labels span {int(y.min())}..{int(y.max())}, outside 0..{num_classes - 1}; rerun "
            "`amoc download`"
        )
    return x, y, stats


def train_classifier(
    model: Classifier,
    trainable: nn.Module,
    spec: TrainSpec,
    *,
    cfg: Config,
    rt: Runtime,
    data: str | os.PathLike,
    train: tuple[torch.Tensor, torch.Tensor],
    out: str | os.PathLike,
    resume: bool,
    train_mode: bool,
    desc: str,
    provenance: dict[str, Any],
    dist: Dist = Dist(),
) -> dict[str, Any]:
    """The common tail of `amoc probe` / `amoc finetune`: hold out `spec.val_images`
    training images, fit on the rest of `train` (from `data`), then write classifier.pt
    (the last epoch), classifier_best.pt (the best epoch on the held-out images; the last
    epoch when validation is off) and summary.json. `provenance` identifies the starting
    point and enters the resume fingerprint."""
    out = Path(out)
    x, y = train
    train_idx, val_idx = _carve_validation(y, spec, cfg.seed)
    val = (x[val_idx], y[val_idx]) if len(val_idx) else None
    data_digest = file_digest(Path(data) / "train.npz")
    fp = run_fingerprint(provenance, spec, cfg, data_digest, model, rt)
    job = ClassifierTraining(
        model,
        trainable,
        spec,
        x[train_idx],
        y[train_idx],
        rt,
        out,
        seed=cfg.seed,
        fingerprint=fp,
        train_mode=train_mode,
        desc=desc,
        val=val,
        dist=dist,
        bn=cfg.distributed.bn,
    )
    summary = job.run(resume)
    if not dist.main:  # rank 0 writes the outputs
        return summary
    best = job.best
    selection = {
        "selected_by": job.selected_by if best else "none (validation off): the last epoch",
        "best_epoch": best["epoch"] if best else summary["epochs"],
        "best_val_acc": best["val_acc"] if best else None,
        "best_val_pgd_acc": best["val_pgd_acc"] if best else None,
    }
    prov = {
        **provenance,
        "data": str(data),
        "data_sha256": data_digest,
        "seed": cfg.seed,
        # wall-clock figures stay out of the weights file: identical runs, identical bytes
        "train": {k: v for k, v in summary.items() if k not in ("spec", "seconds", "images_per_s")},
        "spec": summary["spec"],
        "amoc_version": __version__,
        "torch_version": str(torch.__version__),
    }
    save_classifier(out / "classifier.pt", model, {**prov, "checkpoint": "last", "epoch": summary["epochs"]})
    if best:
        trainable.load_state_dict(best["state"])
    save_classifier(
        out / "classifier_best.pt", model, {**prov, "checkpoint": "best", "epoch": selection["best_epoch"], **selection}
    )
    result = {
        **{k: v for k, v in summary.items() if k != "spec"},
        **selection,
        **provenance,
        "bn_branch": model.bn_branch,
        "seed": cfg.seed,
    }
    io.write_json(out / "summary.json", result)
    print(
        f"{desc}: wrote {out / 'classifier.pt'} (final train loss {summary['train_loss']:.4f}, "
        f"train acc {summary['train_acc']:.2f}%) and classifier_best.pt (epoch {selection['best_epoch']}"
        + (f", {job.selected_by} {best['score']:.2f}%)" if best else ", validation off)")
    )
    return result


def run_fingerprint(
    provenance: dict[str, Any], spec: TrainSpec, cfg: Config, data_digest: str, model: Classifier, rt: Runtime
) -> str:
    """What a resume must match: what the run computes, and the device type, since the
    random state a checkpoint holds is a generator of that device (a CUDA generator's
    state does not fit a CPU one); the world size and thread count are left out."""
    return fingerprint(
        provenance,
        dataclasses.asdict(spec),
        cfg.seed,
        data_digest,
        model.bn_branch,
        model.num_classes,
        rt.device.type,
        str(rt.amp_dtype),
        str(rt.attack_amp_dtype),
        rt.compile,
        cfg.distributed.bn,
    )


def _carve_validation(y: torch.Tensor, spec: TrainSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of the training split: spec.val_images held out."""
    try:
        train_idx, val_idx = validation_split(y.numpy(), spec.val_images, seed)
    except ValueError as exc:
        raise ConfigError(f"{spec.section}.val_images: {exc}; lower it (0 turns validation off)") from None
    return torch.from_numpy(train_idx), torch.from_numpy(val_idx)
