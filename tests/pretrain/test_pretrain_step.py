"""One training step and the attack, for every variant: which queue is written with
what, which BN branch each forward uses, the enqueue order, the attack's contract."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from pretrain_utils import ALL_VARIANTS, BNRecorder, tiny_config, tiny_model, views

from amoc.pretrain.attack import ContrastiveAttack
from amoc.pretrain.losses import info_nce
from amoc.pretrain.step import TrainStep
from amoc.pretrain.variants import Variant
from amoc.runtime import eval_mode

B = 8
STEPS = 2  # PGD steps in tiny_config

# (network, BN branch, train mode) of every forward, written out by hand from the spec.
KC, KA, QC, QA = ("key", "clean", True), ("key", "adv", True), ("query", "clean", True), ("query", "adv", True)
TRAIN_FORWARDS = {
    "CCC": [KC, QC],
    "CAC": [KC, KA, QC],
    "CAA": [KC, KA, QC],
    "ACC": [KC, QC, QA],
    "ACA": [KC, QC, QA],
    "ACA+": [KC, KA, QC, QA],  # KA: the key net on the adversarial *query* views
    "AAC": [KC, KA, QC, QA],
    "AAA": [KC, KA, QC, QA],
}
EVAL_QC, EVAL_KC = ("query", "clean", False), ("key", "clean", False)
EVAL_QA, EVAL_KA = ("query", "adv", False), ("key", "adv", False)
ATTACK_FORWARDS = {  # the clean partner once, then one forward per PGD step per adversarial view
    "CCC": [],
    "CAC": [EVAL_QC] + [EVAL_KA] * STEPS,
    "CAA": [EVAL_QC] + [EVAL_KA] * STEPS,
    "ACC": [EVAL_KC] + [EVAL_QA] * STEPS,
    "ACA": [EVAL_KC] + [EVAL_QA] * STEPS,
    "ACA+": [EVAL_KC] + [EVAL_QA] * STEPS,
    "AAC": [EVAL_QA, EVAL_KA] * STEPS,
    "AAA": [EVAL_QA, EVAL_KA] * STEPS,
}


class Spy:
    """Wraps the attack: keeps its outputs and the forwards it ran."""

    def __init__(self, attack: ContrastiveAttack, recorder: BNRecorder | None = None) -> None:
        self.attack, self.recorder = attack, recorder
        self.out = None
        self.forwards = None

    def __call__(self, *args):
        if self.recorder:
            self.recorder.forwards()
        self.out = self.attack(*args)
        if self.recorder:
            self.forwards = self.recorder.forwards()
        return self.out


def make_step(name: str, order: str = "moco", recorder: bool = False, **overrides):
    cfg = tiny_config(*[f"{k}={v}" for k, v in overrides.items()], variant=name)
    model = tiny_model(cfg, distinct_bn=True)
    ref = copy.deepcopy(model)  # the model before the step
    rec = BNRecorder(model) if recorder else None
    v = Variant.parse(name)
    spy = Spy(ContrastiveAttack(model, v, cfg.pretrain.attack), rec)
    opt = torch.optim.SGD(model.query.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    step = TrainStep(model, v, opt, spy, leverage=cfg.leverage, enqueue_order=order)
    return cfg, model, ref, step, spy, rec


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_bn_branch_of_every_forward(name):
    _, model, _, step, spy, rec = make_step(name, recorder=True)
    x_q, x_k = views()
    step(x_q, x_k, gen())
    assert Counter(spy.forwards) == Counter(ATTACK_FORWARDS[name])
    assert Counter(rec.forwards()) == Counter(TRAIN_FORWARDS[name])
    assert all(m.training for m in model.modules())  # the attack's eval mode was undone
    assert all(m.branch == "clean" for m in model.modules() if hasattr(m, "branch"))


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_queue_writes(name):
    """queue_clean always gets the clean keys; queue_adv gets the adversarial keys
    (CAx/AAx), the key net's features of the adversarial query views (ACA+), or
    nothing (CCC, ACC, ACA)."""
    _, model, ref, step, spy, _ = make_step(name)
    x_q, x_k = views()
    losses = step(x_q, x_k, gen())
    x_q_adv, x_k_adv = spy.out
    v = Variant.parse(name)
    assert (x_q_adv is not None, x_k_adv is not None) == (v.adv_query, v.adv_key)

    def written(queue, before, keys):
        assert torch.allclose(queue[:, :B], keys.t(), atol=1e-6)
        assert torch.equal(queue[:, B:], before[:, B:])

    written(model.queue_clean, ref.queue_clean, ref.keys(x_k, "clean"))
    assert int(model.ptr_clean) == B
    expected_adv = {"none": None, "adv_keys": x_k_adv, "adv_query_keys": x_q_adv}[v.adv_enqueue]
    if expected_adv is None:
        assert torch.equal(model.queue_adv, ref.queue_adv) and int(model.ptr_adv) == 0
    else:
        written(model.queue_adv, ref.queue_adv, ref.keys(expected_adv, "adv"))
        assert int(model.ptr_adv) == B
    assert set(losses) == ({"loss", "loss_clean", "loss_adv"} if v.has_adv_loss else {"loss", "loss_clean"})
    if v.has_adv_loss:
        assert torch.allclose(losses["loss"], 0.5 * losses["loss_clean"] + 0.5 * losses["loss_adv"])
    else:
        assert torch.equal(losses["loss"], losses["loss_clean"])


def test_aca_never_writes_queue_adv_over_many_steps():
    _, model, ref, step, _, _ = make_step("ACA")
    for i in range(6):  # 48 keys through a queue of 40: queue_clean wraps, queue_adv never moves
        x_q, x_k = views(seed=i)
        step(x_q, x_k, gen(i))
    assert torch.equal(model.queue_adv, ref.queue_adv) and int(model.ptr_adv) == 0
    assert int(model.ptr_clean) == 48 % 40


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_key_net_is_only_moved_by_the_ema(name):
    _, model, ref, step, _, _ = make_step(name)
    x_q, x_k = views()
    step(x_q, x_k, gen())
    m = model.key_momentum
    for k_before, q_after, k_after in zip(ref.key.parameters(), model.query.parameters(), model.key.parameters()):
        assert k_after.grad is None and not k_after.requires_grad
        assert torch.allclose(k_after, m * k_before + (1 - m) * q_after, rtol=1e-6, atol=1e-7)
    changed = [not torch.equal(a, b) for a, b in zip(ref.query.parameters(), model.query.parameters())]
    assert any(changed)


@pytest.mark.parametrize("name", ["CCC", "ACA+", "AAA"])
def test_enqueue_order(name):
    """moco: the negatives are the queues before the step. authors: the batch's keys are
    enqueued first, so each positive key is also one of its query's negatives."""
    v = Variant.parse(name)
    results = {}
    for order in ("moco", "authors"):
        _, model, ref, step, spy, _ = make_step(name, order=order)
        x_q, x_k = views()
        losses = step(x_q, x_k, gen())
        x_q_adv, x_k_adv = spy.out
        k_clean = ref.keys(x_k, "clean")
        q_clean = ref.queries(x_q, "clean")
        queue_clean = ref.queue_clean.clone()
        queue_adv = ref.queue_adv.clone()
        if order == "authors":
            queue_clean[:, :B] = k_clean.t()
            if v.adv_enqueue == "adv_keys":
                queue_adv[:, :B] = ref.keys(x_k_adv, "adv").t()
            elif v.adv_enqueue == "adv_query_keys":
                queue_adv[:, :B] = ref.keys(x_q_adv, "adv").t()
            # the positive key is among the negatives that L_clean reads
            sims = (k_clean @ queue_clean) * 0.2  # cosines
            assert torch.allclose(sims.max(dim=1).values, torch.ones(B), atol=1e-5)
        expected_clean = info_nce(q_clean, k_clean, queue_clean)
        assert losses["loss_clean"].item() == pytest.approx(expected_clean.item(), rel=1e-5)
        if v.has_adv_loss:
            q = ref.queries(x_q_adv, "adv") if v.adv_query else q_clean
            k = ref.keys(x_k_adv, "adv") if v.adv_key else k_clean
            expected_adv = info_nce(q, k, queue_adv if v.adv_queue else queue_clean)
            assert losses["loss_adv"].item() == pytest.approx(expected_adv.item(), rel=1e-5)
        results[order] = (losses, model)
    assert results["moco"][0]["loss_clean"].item() != pytest.approx(
        results["authors"][0]["loss_clean"].item(), rel=1e-6
    )
    # the keys written are the same either way; only when the negatives are read differs
    for buf in ("queue_clean", "queue_adv", "ptr_clean", "ptr_adv"):
        assert torch.allclose(
            getattr(results["moco"][1], buf).float(), getattr(results["authors"][1], buf).float(), atol=1e-6
        )


def test_authors_order_puts_a_near_copy_of_each_adversarial_query_among_its_negatives(monkeypatch):
    """ACA+ in the authors' order: the key net's embedding of each query's own adversarial
    view enters queue_adv before L_adv reads it, so every adversarial query meets a near-copy
    of itself (cosine ~1: the key net starts as a copy of the query net) among its
    negatives. In MoCo's order the negatives are the queue before the step."""
    import amoc.pretrain.step as step_module

    best = {}
    for order in ("authors", "moco"):
        calls = []
        monkeypatch.setattr(
            step_module,
            "info_nce",
            lambda q, k, queue, calls=calls, **kw: calls.append((q, queue.clone())) or info_nce(q, k, queue, **kw),
        )
        _, model, _, step, _, _ = make_step("ACA+", order=order)
        x_q, x_k = views()
        step(x_q, x_k, gen())
        q_adv, negatives = calls[1]  # L_clean first, then L_adv (adversarial queries, queue_adv)
        cosines = torch.nn.functional.normalize(q_adv.detach(), dim=1) @ torch.nn.functional.normalize(negatives, dim=0)
        best[order] = cosines.max(dim=1).values  # B: each query's most similar negative
    assert (best["authors"] > 0.999).all(), best["authors"]
    assert (best["moco"] < 0.9).all(), best["moco"]


# --------------------------------------------------------------------------- the attack
def objective(model, v: Variant, x_q, x_k, x_q_adv, x_k_adv) -> float:
    """The variant's L_adv as the attack defines it (eval mode, adv BN for adversarial views)."""
    with eval_mode(model), torch.no_grad():
        q = model.queries(x_q_adv, "adv") if v.adv_query else model.queries(x_q, "clean")
        k = model.keys(x_k_adv, "adv") if v.adv_key else model.keys(x_k, "clean")
        return info_nce(q, k, model.negatives(v.negatives), reduction="sum").item()


@pytest.mark.parametrize("name", ["CAC", "ACA", "ACA+", "AAA"])
def test_attack_contract(name):
    cfg = tiny_config("pretrain.attack.steps=5", variant=name)
    model = tiny_model(cfg)
    v = Variant.parse(name)
    # views with many pixels at 0 and 1, so the [0, 1] clip matters
    x_q, x_k = (torch.where(x > 0.6, 1.0, torch.where(x < 0.4, 0.0, x)) for x in views(seed=5))
    state = copy.deepcopy(model.state_dict())
    x_q_adv, x_k_adv = ContrastiveAttack(model, v, cfg.pretrain.attack)(x_q, x_k, gen(1))
    eps = cfg.pretrain.attack.eps
    for x, adv, on in ((x_q, x_q_adv, v.adv_query), (x_k, x_k_adv, v.adv_key)):
        if not on:
            assert adv is None
            continue
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert (adv - x).abs().max() > eps / 2  # it did move
        assert not adv.requires_grad
    # it raised the contrastive loss it attacks
    clean = objective(model, v, x_q, x_k, x_q, x_k)
    attacked = objective(model, v, x_q, x_k, x_q_adv if v.adv_query else x_q, x_k_adv if v.adv_key else x_k)
    assert attacked > clean + 1e-3
    # and left the model exactly as it was: weights, BN statistics, queues, modes, grads
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.query.parameters())


def test_attack_ccc_is_a_no_op():
    cfg = tiny_config(variant="CCC")
    model = tiny_model(cfg)
    x_q, x_k = views()
    assert ContrastiveAttack(model, Variant.parse("CCC"), cfg.pretrain.attack)(x_q, x_k, gen()) == (None, None)
