"""DynACL's own pieces (amoc/pretrain/dynacl.py, docs/methods.md): the strength and weight
schedules against hand values and against their training loop's rule, the augmentation
at a strength, the EMA key net, and a step's routing and weighting. The stage with its
schedule (boundary, exact resume): tests/pretrain/test_pretrain_methods_stage.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from amoc.config import PretrainConfig
from amoc.nets import build_encoder
from amoc.pretrain.augment import SimCLRAugment
from amoc.pretrain.contrastive import IMAGENET_MEAN, IMAGENET_STD, ContrastiveNet, bn_projector
from amoc.pretrain.dynacl import DynACLNet, DynACLStep, adv_weight, augmentation, strength
from amoc.pretrain.ntxent import nt_xent

CFG = PretrainConfig().dynacl  # period 50, swap 2/3, horizon = the run's epochs


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize(
    "epoch, s, w",
    [  # 0-based epochs of a 1000-epoch run; their 1-based epoch is one more
        (0, 1.0, 1.0),
        (48, 1.0, 1.0),
        (49, 1.0, 1.0 + 0.05 * 2 / 3),  # their epoch 50: 50 // 50 = 1, the weight steps first
        (50, 0.95, 1.0 + 0.05 * 2 / 3),  # their epoch 51 = 50 + 1: the data reloads at strength 0.95
        (99, 0.95, 1.0 + 0.10 * 2 / 3),
        (100, 0.90, 1.0 + 0.10 * 2 / 3),
        (500, 0.50, 1.0 + 0.50 * 2 / 3),
        (998, 0.05, 1.0 + 0.95 * 2 / 3),
        (999, 0.05, 1.0 + 1.00 * 2 / 3),  # the last epoch: w = 5/3, never 2 at 1000 epochs
    ],
)
def test_strength_and_weight_of_the_published_run_by_hand(epoch, s, w):
    assert strength(epoch, CFG, 1000) == pytest.approx(s, abs=1e-12)
    assert adv_weight(epoch, CFG, 1000) == pytest.approx(w, abs=1e-12)


def test_the_schedules_follow_their_training_loops_rule_epoch_by_epoch():
    """Their loop over the 1-based epochs 1..E: the loader is rebuilt at strength
    1 - (epoch - 1) / E when epoch % period == 1 and kept otherwise; the weight is
    min(1 + (epoch // period) * (period / E) * swap, 2) every epoch. Here for E = 1000 and
    E = 200 (the horizon follows pretrain.epochs), with period 50 and, as a run with a
    short period would, 3."""
    for epochs, period in ((1000, 50), (200, 50), (10, 3), (7, 1)):
        cfg = dataclasses.replace(CFG, period=period)
        held = None
        for epoch in range(1, epochs + 1):
            if epoch % period == 1 or period == 1:
                held = 1 - (epoch - 1) / epochs
            weight = min(1.0 + (epoch // period) * (period / epochs) * (2 / 3), 2)
            assert strength(epoch - 1, cfg, epochs) == pytest.approx(held, abs=1e-12), (epochs, period, epoch)
            assert adv_weight(epoch - 1, cfg, epochs) == pytest.approx(weight, abs=1e-12), (epochs, period, epoch)


def test_a_horizon_shorter_than_the_run_floors_the_strength_at_0_and_caps_the_weight_at_2():
    cfg = dataclasses.replace(CFG, horizon=200)
    assert strength(150, cfg, 1000) == pytest.approx(0.25)  # 1 - 150/200, whatever pretrain.epochs
    assert strength(999, cfg, 1000) == 0.0
    assert adv_weight(999, cfg, 1000) == 2.0
    assert adv_weight(149, cfg, 1000) == pytest.approx(1 + 0.75 * 2 / 3)


def test_the_augmentation_at_a_strength_scales_crop_jitter_and_grayscale_not_flip():
    base = CFG.augment
    assert augmentation(base, 1.0) is base
    half = augmentation(base, 0.5)
    assert half.crop_scale == pytest.approx([0.55, 1.0])  # their (1 - 0.9 s, 1)
    assert half.jitter == pytest.approx([0.2, 0.2, 0.2, 0.05])
    assert half.jitter_p == pytest.approx(0.4) and half.gray_p == pytest.approx(0.1)
    assert (half.flip_p, half.blur_p, half.crop_ratio, half.interpolation) == (0.5, 0.0, base.crop_ratio, "bilinear")
    none = augmentation(base, 0.0)
    assert none.crop_scale == [1.0, 1.0] and none.jitter_p == 0 and none.gray_p == 0


def test_views_at_a_lower_strength_are_drawn_weaker():
    """The drawn parameters follow the scaled config: larger crops, jitter and grayscale
    on fewer samples, smaller factors; flips as often."""
    n, g = 4000, torch.Generator().manual_seed(0)
    full = SimCLRAugment(augmentation(CFG.augment, 1.0)).sample_params(n, g)
    low = SimCLRAugment(augmentation(CFG.augment, 0.25)).sample_params(n, g)
    area = lambda p: (p["height"] * p["width"]).double() / 32**2  # noqa: E731
    assert area(full).min() < 0.2 and area(low).min() >= 0.75 - 0.05  # scale (1 - 0.9 * 0.25, 1) = (0.775, 1)
    assert low["jitter"].double().mean() == pytest.approx(0.2, abs=0.03)
    assert low["gray"].double().mean() == pytest.approx(0.05, abs=0.015)
    assert full["jitter"].double().mean() == pytest.approx(0.8, abs=0.03)
    assert low["flip"].double().mean() == pytest.approx(0.5, abs=0.03)
    assert (low["brightness"] - 1).abs().max() <= 0.1 + 1e-6 < (full["brightness"] - 1).abs().max()


# --------------------------------------------------------------------------- model and step
def tiny(seed: int = 0) -> DynACLNet:
    torch.manual_seed(seed)
    encoder = build_encoder(width=0.125, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    net = DynACLNet(ContrastiveNet(encoder, bn_projector(encoder.feature_dim, [64, 64, 64])), key_momentum=0.99)
    with torch.no_grad():  # a key net apart from the query net, as after some steps
        for k in net.key.parameters():
            k.add_(0.05 * torch.randn(k.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return net.train()


def images(b: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, 16, 16, generator=g)
    return tuple((base + 0.05 * torch.randn(base.shape, generator=g)).clamp(0, 1) for _ in range(2))


def test_the_key_net_starts_as_a_copy_and_takes_no_gradient():
    torch.manual_seed(0)
    encoder = build_encoder(width=0.125, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    net = DynACLNet(ContrastiveNet(encoder, bn_projector(encoder.feature_dim, [64, 64, 64])), key_momentum=0.99)
    q, k = net.query.state_dict(), net.key.state_dict()
    assert q.keys() == k.keys() and all(torch.equal(q[n], k[n]) for n in q)
    assert all(p.requires_grad for p in net.query.parameters())
    assert not any(p.requires_grad for p in net.key.parameters())


def test_update_key_averages_the_parameters_and_leaves_the_bn_statistics():
    net = tiny()
    with torch.no_grad():
        for name, buf in net.key.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(1.0)  # the key's own statistics, unlike the query's
    q0, k0 = copy.deepcopy(net.query.state_dict()), copy.deepcopy(net.key.state_dict())
    net.update_key()
    params = {n for n, _ in net.key.named_parameters()}
    for name, value in net.key.state_dict().items():
        if name in params:
            torch.testing.assert_close(value, 0.99 * k0[name] + 0.01 * q0[name], rtol=0, atol=1e-7)
        else:
            assert torch.equal(value, k0[name]), name  # buffers: the key net's own
    assert all(torch.equal(v, q0[n]) for n, v in net.query.state_dict().items())


def test_a_step_routes_view_2_through_the_key_net_and_weights_the_adversarial_term():
    """loss_clean is NT-Xent(query(x1), key(x2)) on the clean BN, in training mode, as a
    copy of the nets before the step computes it (not the query net's own view 2); loss
    is ((2 - w) loss_clean + w loss_adv) / 2 with the epoch's w; the key net ends at
    0.99 key + 0.01 query-before-the-step and its BN statistics moved (its own forwards);
    the query net trained."""
    net, (x1, x2) = tiny(), images()
    step = DynACLStep(net, CFG, torch.optim.SGD(net.query.parameters(), lr=0.5), epochs=1000)
    augment = step.begin_epoch(500)
    assert step.weight == pytest.approx(1 + 0.5 * 2 / 3) and augment == augmentation(CFG.augment, 0.5)
    before = copy.deepcopy(net)
    q0, k0 = copy.deepcopy(net.query.state_dict()), copy.deepcopy(net.key.state_dict())
    with torch.no_grad():
        want = nt_xent(torch.cat([before.query(x1, "clean"), before.key(x2, "clean")]), 2, 0.5)
        query_only = nt_xent(torch.cat([before.query(x1, "clean"), before.query(x2, "clean")]), 2, 0.5)
    losses = step(x1, x2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(losses["loss_clean"], want)
    assert (losses["loss_clean"] - query_only).abs() > 1e-3  # the key net made a difference
    w = step.weight
    torch.testing.assert_close(losses["loss"], ((2 - w) * losses["loss_clean"] + w * losses["loss_adv"]) / 2)
    assert losses["loss_adv"] > losses["loss_clean"]
    for name, p in net.key.named_parameters():
        torch.testing.assert_close(p.detach(), 0.99 * k0[name] + 0.01 * q0[name], rtol=0, atol=1e-7)
    stats = [n for n in k0 if n.endswith("running_mean")]
    assert all(not torch.equal(net.key.state_dict()[n], k0[n]) for n in stats)
    assert any(not torch.equal(p, q0[n]) for n, p in net.query.state_dict().items() if "running" not in n)


def test_the_weight_changes_the_gradient_not_the_terms():
    """Two steps from the same state at weights 1 and 5/3: the same terms (the attack and
    forwards do not depend on w), different updates of the query net."""
    out = []
    for epoch in (0, 999):
        net, (x1, x2) = tiny(), images()
        step = DynACLStep(net, CFG, torch.optim.SGD(net.query.parameters(), lr=0.5), epochs=1000)
        step.begin_epoch(epoch)
        out.append((step(x1, x2, torch.Generator().manual_seed(0)), net.query.state_dict()))
    (a, qa), (b, qb) = out
    assert torch.equal(a["loss_clean"], b["loss_clean"]) and torch.equal(a["loss_adv"], b["loss_adv"])
    assert any(not torch.equal(qa[n], qb[n]) for n in qa if "running" not in n)
