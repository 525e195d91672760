"""runtime.compile compiles the per-step hot paths only (amoc.training.hot): each call site
its own compiled callable, static shapes, a bounded number of graphs; validation, the k-NN
monitor and a partial last batch run eager and never compile.

torch.compile is replaced by a spy that compiles with a counting eager backend (inductor
takes minutes on this CPU), one label per compiled callable, and Dynamo is told to fail
instead of silently falling back to eager when a callable passes its recompile limit."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch._dynamo
from downstream_helpers import make_prepared, params_file, random_encoder, run_stage
from pretrain_utils import tiny_config, write_prepared

from amoc import cli
from amoc.distributed import Dist
from amoc.downstream.trainer import ClassifierTraining, TrainSpec
from amoc.nets import build_encoder
from amoc.nets.classifier import Classifier
from amoc.pretrain.stage import Pretraining
from amoc.runtime import setup


class CompileSpy:
    """Stands in for torch.compile: the same call, with a backend that counts the graphs of
    each compiled callable (labelled by the callable's name) and runs them eagerly."""

    def __init__(self) -> None:
        self.real = torch.compile
        self.graphs: Counter[str] = Counter()
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, model=None, **kwargs):
        label = getattr(model, "__name__", type(model).__name__)
        self.calls.append((label, dict(kwargs)))

        def backend(gm, example_inputs):
            self.graphs[label] += 1
            return gm.forward

        return self.real(model, **{**kwargs, "backend": backend})


@pytest.fixture
def spy(monkeypatch) -> CompileSpy:
    torch._dynamo.reset()
    spy = CompileSpy()
    monkeypatch.setattr(torch, "compile", spy)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield spy
    torch._dynamo.reset()


def during(monkeypatch, cls, name: str, spy: CompileSpy) -> list[int]:
    """Wrap cls.name to record how many graphs were compiled while it ran."""
    added: list[int] = []
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        before = sum(spy.graphs.values())
        try:
            return original(self, *args, **kwargs)
        finally:
            added.append(sum(spy.graphs.values()) - before)

    monkeypatch.setattr(cls, name, wrapper)
    return added


def read_losses(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return [row["loss"] for row in csv.DictReader(fh)]


# trades: the training forwards (x_adv and x in one call), the attack's forward with grad
# (PGD steps) and without (the TRADES target); pgd_at: one training forward, the PGD forward
EXPECTED = {
    "trades": {"amoc_hot_train_forwards": 1, "amoc_hot_attack": 2},
    "pgd_at": {"amoc_hot_train_forwards": 1, "amoc_hot_attack": 1},
}


@pytest.mark.parametrize("loss", ["trades", "pgd_at"])
def test_finetune_compiles_the_hot_path_once_and_never_validation(tmp_path, spy, monkeypatch, loss):
    """Two epochs of 96 training images in batches of 64 (a partial last batch of 32) with
    32 validation images: a fixed number of graphs, none while validating, all static, and
    the same losses as the eager run."""
    data = make_prepared(tmp_path / "data", n_train=128, n_test=16)
    encoder, params = random_encoder(tmp_path / "encoder.pt"), params_file(tmp_path)
    validating = during(monkeypatch, ClassifierTraining, "validate", spy)
    sets = {"finetune.epochs": 2, "finetune.milestones": [1], "finetune.val_images": 32, "finetune.loss": loss}
    losses = {}
    for compiled in (True, False):
        out = tmp_path / f"compiled-{compiled}"
        args = ("--init", str(encoder), "--data", str(data), "--out", str(out))
        assert run_stage("finetune", params, *args, **{**sets, "runtime.compile": compiled}) == 0
        losses[compiled] = read_losses(out / "log.csv")
        if compiled:
            assert validating == [0, 0]  # validation ran after both epochs and compiled nothing
            assert dict(spy.graphs) == EXPECTED[loss]
            assert all(kwargs.get("dynamic") is False for _, kwargs in spy.calls), spy.calls
    assert spy.graphs == Counter(EXPECTED[loss])  # the eager run compiled nothing
    assert losses[True] == losses[False]  # the eager backend runs the same ops


# ACA+'s attack: the query net's adv forward with input gradient, the key net's clean one
# without; AAA's: query and key net adv forwards, both with input gradient, one graph (Dynamo
# passes the parameters of same-shaped modules as inputs). Keys: clean and adv BN.
@pytest.mark.parametrize("variant,expected", [("ACA+", {"attack": 2, "keys": 2}), ("AAA", {"attack": 1, "keys": 2})])
def test_pretrain_compiles_the_step_and_not_the_knn_monitor(tmp_path, spy, monkeypatch, variant, expected):
    """Two epochs of 5 steps with the k-NN monitor after each: the attack, the key net's
    training forwards and the query pass each compiled once per kind of call, none for k-NN."""
    data = write_prepared(tmp_path / "data")
    params = tmp_path / "params.yaml"
    assert cli.main(["params", "--preset", "tiny", "--out", str(params)]) == 0
    knn = during(monkeypatch, Pretraining, "knn", spy)
    sets = [
        f"variant={variant}",
        "runtime.device=cpu",
        "runtime.threads=1",
        "runtime.compile=true",
        "pretrain.batch_size=8",
        "pretrain.epochs=2",
        "pretrain.knn_every=1",
        "pretrain.knn_k=5",
        "queue_size=20",
        "pretrain.queue_size_adv=12",
    ]
    argv = ["pretrain", "--params", str(params), "--data", str(data), "--out", str(tmp_path / "out")]
    assert cli.main(argv + [arg for s in sets for arg in ("--set", s)]) == 0
    want = {f"amoc_hot_{name}": n for name, n in {**expected, "query_pass": 1}.items()}
    # the random-init encoder's (as initialised, then with training BN statistics), then after each epoch
    assert knn == [0, 0, 0, 0]
    assert dict(spy.graphs) == want
    assert all(kwargs.get("dynamic") is False for _, kwargs in spy.calls), spy.calls


# ---------------------------------------------------------------------------------------
# No unused parameters under DDP: the BN branch a module never runs is frozen instead


class WrapSpy:
    """Stands in for Dist.wrap (`install`): records find_unused_parameters, returns the module."""

    def __init__(self, monkeypatch) -> None:
        self.find_unused: list[bool] = []

        def wrap(dist, module, *, find_unused_parameters: bool = False):
            self.find_unused.append(find_unused_parameters)
            return module

        monkeypatch.setattr(Dist, "wrap", wrap)


def trainable_without_grad(module: torch.nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("train_mode", [True, False])
def test_classifier_training_leaves_ddp_no_unused_parameter(tmp_path, monkeypatch, train_mode):
    """Fine-tuning (train mode, adv BN) freezes the clean BN branch; after a step every
    parameter that still requires a gradient has one, so DDP runs without
    find_unused_parameters. The frozen branch keeps its values. A probe (eval mode, frozen
    encoder) trains the head only."""
    wrap = WrapSpy(monkeypatch)
    cfg = tiny_config("finetune.batch_size=8", "finetune.attack.steps=1")
    rt = setup(cfg.runtime, 0)
    model = Classifier(build_encoder(width=0.0625), 4)
    if not train_mode:
        model.encoder.requires_grad_(False)
    clean = {n: p.detach().clone() for n, p in model.named_parameters() if ".clean." in n}
    spec = TrainSpec.from_section(cfg.finetune, name="finetune", loss="trades", weight_decay=5e-4, cfg=cfg)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (16, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(16) % 4
    job = ClassifierTraining(
        model,
        model if train_mode else model.head,
        spec,
        x,
        y,
        rt,
        tmp_path,
        seed=0,
        fingerprint="f",
        train_mode=train_mode,
        desc="t",
    )
    job.begin_epoch(0, 0)
    job.train_step(0, 0)
    assert wrap.find_unused == [False]
    assert trainable_without_grad(model) == []
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    if train_mode:
        assert any(".adv." in n for n in trained) and not any(".clean." in n for n in trained)
        assert "encoder.conv1.weight" in trained
    else:
        assert trained == ["head.weight", "head.bias"]
    assert all(torch.equal(p, clean[n]) for n, p in model.named_parameters() if n in clean)


@pytest.mark.parametrize("variant", ["CCC", "CAC", "ACA+", "AAA"])
def test_pretraining_leaves_ddp_no_unused_parameter(tmp_path, monkeypatch, variant):
    """The query pass runs the adv BN only when the query is adversarial; otherwise that
    branch is frozen, and after a step every query parameter that requires a gradient has
    one, so DDP runs without find_unused_parameters."""
    wrap = WrapSpy(monkeypatch)
    data = write_prepared(tmp_path / "data")
    job = Pretraining(tiny_config(variant=variant), data, tmp_path / "out")
    adv_before = {n: p.detach().clone() for n, p in job.model.query.named_parameters() if ".adv." in n}
    job.begin_epoch(0, 0)
    job.train_step(0, 0)
    assert wrap.find_unused == [False]
    assert trainable_without_grad(job.model.query) == []
    adv_trained = any(p.requires_grad for n, p in job.model.query.named_parameters() if ".adv." in n)
    assert adv_trained == (variant in ("ACA+", "AAA"))
    if not adv_trained:  # frozen and untouched by the step (the EMA only reads them)
        assert all(torch.equal(p, adv_before[n]) for n, p in job.model.query.named_parameters() if n in adv_before)
