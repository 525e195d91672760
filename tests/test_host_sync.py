"""No host sync in the per-step paths: pre-training steps (TrainStep, and the stage's step
with its augmentation and log) and fine-tuning steps (loss_step, ClassifierTraining's
step) run under tests/sync_guard.py's NoHostSync, the CPU stand-in for
torch.cuda.set_sync_debug_mode("error"). On a GPU each sync would stall the host."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pretrain_utils import tiny_config, tiny_model, views, write_prepared
from sync_guard import HostSync, NoHostSync

from amoc.attacks.accuracy import correct
from amoc.attacks.ce import ce_pgd
from amoc.config import AttackConfig
from amoc.downstream.trainer import ClassifierTraining, Forwards, TrainSpec, loss_step
from amoc.nets import build_encoder
from amoc.nets.classifier import Classifier
from amoc.pretrain import step as step_module
from amoc.pretrain.attack import ContrastiveAttack
from amoc.pretrain.stage import Pretraining
from amoc.pretrain.step import TrainStep
from amoc.pretrain.variants import Variant
from amoc.runtime import setup

STEPS = 3


# ------------------------------------------------------------------ the detector itself
SYNCS = {
    "item": lambda t: t.sum().item(),
    "tolist": lambda t: t.tolist(),
    "if": lambda t: 1 if t.sum() > 0 else 0,
    "int": lambda t: int(t[0]),
    "float": lambda t: float(t.max()),
    "index": lambda t: list(range(4))[t.long()[0]],
    "cpu": lambda t: t.cpu(),
    "numpy": lambda t: t.numpy(),
    "nonzero": lambda t: (t > 0.5).nonzero(),
    "unique": lambda t: torch.unique(t),
    "mask": lambda t: t[t > 0.5],
    "mask_assign": lambda t: t.clone().__setitem__(t > 0.5, 0.0),
    "masked_select": lambda t: t.masked_select(t > 0.5),
    "where": lambda t: torch.where(t > 0.5),
    "repeat_interleave": lambda t: t.repeat_interleave(t.long() + 1),
    "one_hot": lambda t: F.one_hot(t.long()),
    "print": lambda t: f"{t[0]}",
    "equal": lambda t: torch.equal(t, t),
}
FREE = {  # the same results without a sync
    "sum": lambda t: t.sum(),
    "where3": lambda t: torch.where(t > 0.5, t, 0.0),
    "index": lambda t: t[t.argsort()],
    "masked_fill": lambda t: t.masked_fill(t > 0.5, 0.0),
    "shape": lambda t: t.new_zeros(t.shape[0] + len(t)),
    "one_hot": lambda t: F.one_hot(t.long(), 4),
    "any": lambda t: (t > 0.5).any(),
}


@pytest.mark.parametrize("name", SYNCS)
def test_the_detector_catches_a_sync(name):
    t = torch.rand(6, generator=torch.Generator().manual_seed(0)) * 3
    with pytest.raises(HostSync), NoHostSync():
        SYNCS[name](t)


@pytest.mark.parametrize("name", FREE)
def test_the_detector_lets_device_side_ops_run(name):
    t = torch.rand(6, generator=torch.Generator().manual_seed(0)) * 3
    with NoHostSync():
        FREE[name](t)


# ------------------------------------------------------------------ pre-training
def make_train_step(variant: str):
    cfg = tiny_config(variant=variant)
    model = tiny_model(cfg)
    v = Variant.parse(variant)
    opt = torch.optim.SGD(model.query.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return TrainStep(model, v, opt, ContrastiveAttack(model, v, cfg.pretrain.attack), leverage=cfg.leverage)


@pytest.mark.parametrize("variant", ["ACA+", "AAA", "CCC"])
@pytest.mark.parametrize("order", ["authors", "moco"])
def test_pretraining_steps_do_not_sync(variant, order):
    step = make_train_step(variant)
    step.enqueue_order = order
    x_query, x_key = views()
    g = torch.Generator().manual_seed(0)
    with NoHostSync() as guard:
        for _ in range(STEPS):
            losses = step(x_query, x_key, g)
    assert guard.seen > 0 and torch.isfinite(losses["loss"])


def test_the_stage_step_with_augmentation_and_log_does_not_sync(tmp_path):
    job = Pretraining(tiny_config(), write_prepared(tmp_path / "data"), tmp_path / "out")
    job.begin_epoch(0, 0)  # once an epoch: the epoch's order comes from the host
    with NoHostSync():
        for step in range(STEPS):
            job.train_step(0, step)
    assert job.log.count == STEPS


def test_a_planted_item_in_the_step_is_caught(monkeypatch):
    real = step_module.info_nce

    def info_nce(*args, **kwargs):
        loss = real(*args, **kwargs)
        loss.item()  # e.g. a debug print of the loss
        return loss

    monkeypatch.setattr(step_module, "info_nce", info_nce)
    step = make_train_step("ACA+")
    x_query, x_key = views()
    with pytest.raises(HostSync, match=r"item\(\)"), NoHostSync():
        step(x_query, x_key, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ fine-tuning
def downstream(loss: str, *extra: str):
    cfg = tiny_config("finetune.batch_size=8", "finetune.attack.steps=2", *extra)
    rt = setup(cfg.runtime, 0)
    torch.manual_seed(0)
    model = Classifier(build_encoder(width=0.0625), 4).train()
    spec = TrainSpec.from_section(cfg.finetune, name="finetune", loss=loss, weight_decay=5e-4, cfg=cfg)
    return model, spec, rt


@pytest.mark.parametrize("loss", ["trades", "pgd_at", "ce"])
def test_loss_steps_do_not_sync(loss):
    model, spec, rt = downstream(loss)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 4
    g = torch.Generator().manual_seed(0)
    forwards = Forwards(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with NoHostSync():
        for _ in range(STEPS):
            out, _, _ = loss_step(model, spec, x, y, rt, g, forwards)
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()


@pytest.mark.parametrize("loss", ["trades", "pgd_at"])
def test_classifier_training_steps_do_not_sync(tmp_path, loss):
    """Three steps of an epoch of 20 images in batches of 8: two full, one partial."""
    model, spec, rt = downstream(loss)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 256, (20, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(20) % 4
    job = ClassifierTraining(model, model, spec, x, y, rt, tmp_path, seed=0, fingerprint="f", train_mode=True, desc="t")
    job.begin_epoch(0, 0)
    with NoHostSync():
        for step in range(job.steps_in_epoch()):
            job.train_step(0, step)
    assert job.seen == 20


# ------------------------------------------------------------------ evaluation batches
def test_counting_correctness_reads_the_host_once_per_call_not_per_batch():
    """accuracy.correct (validation, PGD-20, AutoAttack, corruptions) reads the largest
    label once before its loop, not after every batch (it did: int(yb.max()) per batch)."""
    model, _, rt = downstream("ce")
    model.eval()
    x = torch.randint(0, 256, (20, 3, 16, 16), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    y = torch.arange(20) % 4
    attack = AttackConfig(eps=8 / 255, steps=2)
    g = torch.Generator().manual_seed(0)
    with NoHostSync(count_only=True) as guard:
        correct(model, x, y, rt, 8, lambda xb, yb: ce_pgd(model, xb, yb, attack, g))  # 3 batches
    assert len(guard.syncs) == 1 and "__int__" in guard.syncs[0], guard.syncs
