"""The resumable supervised training loop shared by `amoc probe` and `amoc finetune`.

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
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from amoc import __version__, io
from amoc.checkpoint import CheckpointManager, fingerprint, rng_state, set_rng_state
from amoc.config import AttackConfig, Config
from amoc.data.prepared import load_split, load_stats
from amoc.distributed import Dist, Shard
from amoc.distributed.bn import synchronise_bn
from amoc.downstream.augment import crop_flip
from amoc.downstream.classifier import Classifier, save_classifier
from amoc.downstream.losses import ce_attack, trades_attack, trades_loss
from amoc.errors import DataError
from amoc.runtime import Runtime, eval_mode, oom_hint
from amoc.schedule import multistep, scaled_lr, set_lr
from amoc.stopping import StopSignals, Stopped, check_finite, check_finite_params

LossName = Literal["ce", "trades", "pgd_at"]
LOG_COLUMNS = ("epoch", "loss", "train_acc", "train_adv_acc", "lr", "seconds", "images_per_s")
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
    attack: AttackConfig
    section: str = "finetune"  # the params section, for error messages ("probe.batch_size")

    @classmethod
    def from_section(cls, section: Any, *, name: str, loss: LossName, weight_decay: float,
                     cfg: Config) -> "TrainSpec":
        """`cfg` supplies the learning-rate scaling rule (distributed.lr_scaling)."""
        d = cfg.distributed
        lr = scaled_lr(section.lr, section.batch_size, d.lr_scaling, d.reference_batch)
        return cls(loss=loss, epochs=section.epochs, batch_size=section.batch_size, lr=lr,
                   momentum=section.momentum, weight_decay=weight_decay,
                   milestones=tuple(section.milestones), lr_gamma=section.lr_gamma, beta=section.beta,
                   attack=section.attack, section=name)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (the encoder a run starts from, the data it trains on)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Forwards(nn.Module):
    """The model's training forwards of one step in one call (TRADES needs two), so that
    DistributedDataParallel sees one forward per backward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(x) for x in xs)


def loss_step(model: nn.Module, spec: TrainSpec, x: torch.Tensor, y: torch.Tensor, rt: Runtime,
              generator: torch.Generator, forwards: nn.Module | None = None,
              shard: Shard = Shard()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, logits on clean x or None, logits on x_adv or None) for one batch. The
    attacks run on `model`; the trained forwards go through `forwards` (Forwards(model),
    under DDP in a multi-process run)."""
    forwards = forwards or Forwards(model)
    if spec.loss == "ce":
        with rt.autocast():
            (logits,) = forwards(x)
        return F.cross_entropy(logits.float(), y), logits, None
    with eval_mode(model), rt.autocast():  # attacks use running BN statistics
        if spec.loss == "trades":
            x_adv = trades_attack(model, x, spec.attack, generator, shard=shard)
        else:
            x_adv = ce_attack(model, x, y, spec.attack, generator, shard=shard)
    with rt.autocast():
        if spec.loss == "pgd_at":
            (logits_adv,) = forwards(x_adv)
            return F.cross_entropy(logits_adv.float(), y), None, logits_adv
        logits_adv, logits_nat = forwards(x_adv, x)
    return trades_loss(logits_nat, logits_adv, y, spec.beta), logits_nat, logits_adv


def _batches(perm: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(perm, batch_size))


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    lines = [",".join(LOG_COLUMNS)]
    for row in rows:
        lines.append(",".join("" if row.get(c) is None else str(row[c]) for c in LOG_COLUMNS))
    io.write_text(path, "\n".join(lines) + "\n")


def fit(model: nn.Module, trainable: nn.Module, spec: TrainSpec, x: torch.Tensor, y: torch.Tensor,
        rt: Runtime, out: str | os.PathLike, *, seed: int, fingerprint: str, resume: bool,
        train_mode: bool, desc: str, dist: Dist = Dist(), bn: str = "sync") -> dict[str, Any]:
    """Train `trainable`'s parameters (part or all of `model`) on uint8 images x (N x C x H x W)
    and labels y. `train_mode` False keeps the whole model in eval mode (linear probes:
    frozen BN statistics). Writes out/log.csv and out/checkpoints/; returns a summary.
    `dist` and `bn` (distributed.bn): a multi-process run, see the module's docstring."""
    out = Path(out)
    device = rt.device
    x_dev, y_dev = x.to(device), y.to(device)
    n = x_dev.shape[0]
    if train_mode:
        synchronise_bn(model, dist, bn)  # in place: the model's modules are what gets trained
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    generator = rt.generator(seed)
    ckpts = CheckpointManager(out / "checkpoints", fingerprint)

    start_epoch, start_step, perm, partial, rows = 0, 0, None, None, []
    blob = ckpts.load_latest() if resume else None
    if not resume and dist.main:
        ckpts.clear()
    dist.barrier()  # no rank reads while rank 0 clears
    if blob is not None:
        trainable.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        set_rng_state(blob["rng"], generator)
        start_epoch, start_step, rows = int(blob["epoch"]), int(blob["step"]), list(blob["rows"])
        if start_step:
            perm, partial = blob["perm"].to(device), blob["partial"]
        if dist.main:
            print(f"{desc}: resuming at epoch {start_epoch + 1}" + (f", step {start_step}" if start_step else ""))
    elif resume and dist.main:
        print(f"{desc}: no usable checkpoint in {ckpts.folder}; starting from the beginning", file=sys.stderr)

    def state(perm: torch.Tensor | None, partial: dict | None) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in trainable.state_dict().items()},
                "optimizer": optimizer.state_dict(), "rng": rng_state(generator),
                "perm": None if perm is None else perm.cpu(), "partial": partial, "rows": rows}

    model.train(train_mode)
    # A fine-tuned encoder runs one BN branch only: the other's parameters get no gradient.
    forwards = dist.wrap(Forwards(model), find_unused_parameters=train_mode)

    with StopSignals() as stop, oom_hint(desc, f"{spec.section}.batch_size", spec.batch_size):
        for epoch in range(start_epoch, spec.epochs):
            lr = multistep(epoch, spec.lr, spec.milestones, spec.lr_gamma)
            set_lr(optimizer, lr)
            if perm is None:
                perm = torch.randperm(n, generator=generator, device=device)
                partial = {"loss_sum": 0.0, "correct": 0, "adv_correct": 0, "seen": 0, "seconds": 0.0}
                start_step = 0
            batches = [b for b in _batches(perm, spec.batch_size) if len(b) >= dist.world]
            # device-side accumulators of this rank's images (rank 0 carries a resumed
            # epoch's totals): no host sync per step; summed over the ranks when read
            carried = partial if dist.main else {"loss_sum": 0.0, "correct": 0, "adv_correct": 0}
            loss_sum = torch.tensor(carried["loss_sum"], dtype=torch.float64, device=device)
            correct = torch.tensor(carried["correct"], dtype=torch.int64, device=device)
            adv_correct = torch.tensor(carried["adv_correct"], dtype=torch.int64, device=device)
            seen = partial["seen"]  # images of the global batches so far
            t0 = time.perf_counter()
            bar = tqdm(total=len(batches), initial=start_step, desc=f"{desc} {epoch + 1}/{spec.epochs}",
                       disable=not (rt.progress and dist.main), leave=False, dynamic_ncols=True)
            for step in range(start_step, len(batches)):
                shard = dist.shard(len(batches[step]))
                idx = shard.rows(batches[step])
                xb = rt.images(crop_flip(x_dev[idx], generator, shard=shard))
                yb = y_dev[idx]
                loss, logits, logits_adv = loss_step(model, spec, xb, yb, rt, generator, forwards, shard)
                optimizer.zero_grad(set_to_none=True)
                # DDP averages over the ranks: weight each rank's mean by its share of the batch
                (loss * (len(idx) * dist.world / shard.total) if dist.active else loss).backward()
                optimizer.step()
                with torch.no_grad():
                    loss_sum += loss.detach().double() * len(idx)
                    if logits is not None:
                        correct += (logits.argmax(1) == yb).sum()
                    if logits_adv is not None:
                        adv_correct += (logits_adv.argmax(1) == yb).sum()
                seen += shard.total
                bar.update(1)
                synced = (step + 1) % FINITE_EVERY == 0 or step + 1 == len(batches)
                if synced:
                    total = dist.sum(loss_sum)
                    check_finite({"loss": total}, epoch=epoch + 1, step=step + 1)
                    bar.set_postfix(loss=f"{total.item() / seen:.4f}", lr=f"{lr:g}")
                requested = stop.requested
                if dist.should_stop(bool(requested), synced) and step + 1 < len(batches):
                    bar.close()
                    total = dist.sum(loss_sum)
                    check_finite({"loss": total}, epoch=epoch + 1, step=step + 1)
                    partial = {"loss_sum": total.item(), "correct": int(dist.sum(correct)),
                               "adv_correct": int(dist.sum(adv_correct)),
                               "seen": seen, "seconds": partial["seconds"] + time.perf_counter() - t0}
                    path = (ckpts.save(epoch, state(perm, partial), step=step + 1) if dist.main
                            else ckpts.path(epoch, step + 1))  # rank 0 writes it
                    raise Stopped(f"{requested or 'a stop signal'} received: saved {path} (epoch {epoch + 1}, "
                                  f"step {step + 1}); rerun with --resume to continue")
            bar.close()
            loss_sum, correct, adv_correct = dist.sum(loss_sum), dist.sum(correct), dist.sum(adv_correct)
            seconds = partial["seconds"] + time.perf_counter() - t0
            check_finite_params(trainable, epoch=epoch + 1)
            clean_acc = 100 * int(correct) / seen if spec.loss != "pgd_at" else None
            adv_acc = 100 * int(adv_correct) / seen if spec.loss != "ce" else None
            row = {"epoch": epoch + 1, "loss": f"{loss_sum.item() / seen:.6f}",
                   # train_acc: on the examples the loss is about (adversarial ones for PGD-AT)
                   "train_acc": f"{clean_acc if clean_acc is not None else adv_acc:.4f}",
                   "train_adv_acc": None if adv_acc is None else f"{adv_acc:.4f}",
                   "lr": f"{lr:.6g}", "seconds": f"{seconds:.3f}", "images_per_s": f"{seen / max(seconds, 1e-9):.1f}"}
            rows.append(row)
            if dist.main:
                _write_log(out / "log.csv", rows)
                ckpts.save(epoch + 1, state(None, None))
                print(f"{desc} epoch {epoch + 1}/{spec.epochs}: loss {row['loss']}, train_acc {float(row['train_acc']):.2f}%"
                      + (f", train_adv_acc {float(row['train_adv_acc']):.2f}%" if row["train_adv_acc"] else "")
                      + f", lr {lr:g}, {seconds:.1f} s, {row['images_per_s']} images/s", flush=True)
            perm, partial = None, None
            if epoch + 1 < spec.epochs and dist.should_stop(bool(stop.requested), True):
                raise Stopped(f"{stop.requested} received: saved the checkpoint of epoch {epoch + 1}; "
                              "rerun with --resume to continue")

    if dist.main:
        _write_log(out / "log.csv", rows)
    last = rows[-1]
    total = sum(float(r["seconds"]) for r in rows)
    return {"epochs": len(rows), "train_loss": float(last["loss"]),
            "train_acc": float(last["train_acc"]),
            "train_adv_acc": None if last["train_adv_acc"] is None else float(last["train_adv_acc"]),
            "seconds": round(total, 3), "images_per_s": round(len(rows) * n / max(total, 1e-9), 1),
            "n_train": n, "loss_fn": spec.loss, "spec": dataclasses.asdict(spec)}


def load_train_data(folder: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(uint8 images, labels, stats) of the prepared train split, labels checked."""
    x, y = load_split(folder, "train")
    stats = load_stats(folder)
    num_classes = stats.get("num_classes")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise DataError(f"{Path(folder) / 'stats.json'}: num_classes {num_classes!r} is not a class count >= 2; rerun `amoc download`")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"{folder}: train labels span {int(y.min())}..{int(y.max())}, outside 0..{num_classes - 1}; rerun `amoc download`")
    return x, y, stats


def train_classifier(model: Classifier, trainable: nn.Module, spec: TrainSpec, *, cfg: Config, rt: Runtime,
                     data: str | os.PathLike, train: tuple[torch.Tensor, torch.Tensor], out: str | os.PathLike,
                     resume: bool, train_mode: bool, desc: str, provenance: dict[str, Any],
                     dist: Dist = Dist()) -> dict[str, Any]:
    """The common tail of `amoc probe` / `amoc finetune`: fit on `train` (from `data`), then
    write classifier.pt and metrics.json. `provenance` identifies the starting point and
    enters the resume fingerprint."""
    out = Path(out)
    x, y = train
    data_digest = file_digest(Path(data) / "train.npz")
    # what the run computes (not where or how fast): a resume must match all of it
    fp = fingerprint(provenance, dataclasses.asdict(spec), cfg.seed, data_digest, model.bn_branch,
                     model.num_classes, str(rt.amp_dtype), cfg.distributed.bn)
    summary = fit(model, trainable, spec, x, y, rt, out, seed=cfg.seed, fingerprint=fp, resume=resume,
                  train_mode=train_mode, desc=desc, dist=dist, bn=cfg.distributed.bn)
    if not dist.main:  # rank 0 writes the outputs
        return summary
    prov = {**provenance, "data": str(data), "data_sha256": data_digest, "seed": cfg.seed,
            # wall-clock figures stay out of the weights file: identical runs, identical bytes
            "train": {k: v for k, v in summary.items() if k not in ("spec", "seconds", "images_per_s")},
            "spec": summary["spec"],
            "amoc_version": __version__, "torch_version": str(torch.__version__)}
    save_classifier(out / "classifier.pt", model, prov)
    metrics = {**{k: v for k, v in summary.items() if k != "spec"}, **provenance, "bn_branch": model.bn_branch,
               "seed": cfg.seed}
    io.write_json(out / "metrics.json", metrics)
    print(f"{desc}: wrote {out / 'classifier.pt'} (final train loss {summary['train_loss']:.4f}, "
          f"train acc {summary['train_acc']:.2f}%)")
    return metrics
