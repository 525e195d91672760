"""ACL, RoCL and DynACL's pieces (docs/methods.md): NT-Xent against a loop, its value at
initialisation, each method's attack, LARS against a hand computation (DynACL's own:
tests/pretrain/test_dynacl.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from amoc.config import PretrainConfig
from amoc.nets import build_encoder
from amoc.pretrain.acl import ACLStep
from amoc.pretrain.augment import SimCLRAugment
from amoc.pretrain.contrastive import ContrastiveNet, bn_projector, mlp_projector
from amoc.pretrain.dynacl import DynACLNet, DynACLStep
from amoc.pretrain.lars import LARS
from amoc.pretrain.ntxent import nt_xent
from amoc.pretrain.rocl import RoCLStep


def loop_nt_xent(z: torch.Tensor, views: int, t: float) -> float:
    """Every anchor, every positive, one -log term each, written out."""
    z = F.normalize(z.double(), dim=1)
    n = z.shape[0]
    b = n // views
    total = 0.0
    for i in range(n):
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        for j in range(n):
            if j != i and j % b == i % b:  # the same image in another view
                total -= math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / n


@pytest.mark.parametrize("views", [2, 3])
def test_nt_xent_matches_a_loop_over_anchors_and_positives(views):
    z = torch.randn(views * 6, 8, generator=torch.Generator().manual_seed(views))
    assert nt_xent(z, views, 0.5).item() == pytest.approx(loop_nt_xent(z, views, 0.5), rel=1e-5)


@pytest.mark.parametrize("views", [2, 3])
def test_ranks_losses_average_to_the_global_batchs_loss(views):
    """Each rank's anchors against every rank's keys (view-major, rank order): the mean
    of the ranks' losses is the loss of the whole batch."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(views, 8, 5, generator=g)  # views x B x D
    whole = nt_xent(z.reshape(-1, 5), views, 0.5)
    keys = z.reshape(-1, 5)
    parts = [
        nt_xent(z[:, rows].reshape(-1, 5), views, 0.5, keys=keys, offset=rows.start)
        for rows in (slice(0, 4), slice(4, 8))
    ]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, whole)


def tiny_acl(seed: int = 0) -> ContrastiveNet:
    torch.manual_seed(seed)
    encoder = build_encoder(width=0.125, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return ContrastiveNet(encoder, bn_projector(encoder.feature_dim, [64, 64, 64]))


def tiny_rocl(seed: int = 0) -> ContrastiveNet:
    torch.manual_seed(seed)
    encoder = build_encoder(width=0.125, mean=(0, 0, 0), std=(1, 1, 1))
    return ContrastiveNet(encoder, mlp_projector(encoder.feature_dim, [128, 32]))


def tiny_dynacl(seed: int = 0) -> DynACLNet:
    net = DynACLNet(tiny_acl(seed), key_momentum=0.99)
    with torch.no_grad():  # a key net that differs from the query net, as it does after a few steps
        for k in net.key.parameters():
            k.add_(0.05 * torch.randn(k.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return net


def make_step(method: str, cfg, net, optimizer):
    if method == "dynacl":
        return DynACLStep(net, cfg, optimizer, epochs=10)
    return (ACLStep if method == "acl" else RoCLStep)(net, cfg, optimizer)


def trained(method: str, net) -> torch.nn.Module:
    """What the step trains: DynACL's query net (its key net follows by EMA)."""
    return net.query if method == "dynacl" else net


def views(b: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, 16, 16, generator=g)
    jitter = lambda: (base + 0.05 * torch.randn(base.shape, generator=g)).clamp(0, 1)  # noqa: E731
    return jitter(), jitter()


def test_acl_loss_of_a_random_encoder_is_near_log_2b_minus_1():
    """At initialisation the embeddings barely tell images apart: every logit is about
    the same, and the NT-Xent is about log(2B - 1), the chance level."""
    net = tiny_acl().train()
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    augment = SimCLRAugment(PretrainConfig().acl.augment)
    x1, x2 = augment(images, g), augment(images, g)
    with torch.no_grad():
        loss = nt_xent(net(torch.cat([x1, x2]), "clean"), 2, 0.5)
    assert loss.item() == pytest.approx(math.log(2 * 32 - 1), abs=0.15)


@pytest.mark.parametrize("method", ["acl", "rocl", "dynacl"])
def test_each_methods_attack_raises_its_objective_inside_the_ball(method):
    cfg = getattr(PretrainConfig(), method)
    net = {"acl": tiny_acl, "rocl": tiny_rocl, "dynacl": tiny_dynacl}[method]()
    step = make_step(method, cfg, net, torch.optim.SGD(trained(method, net).parameters(), lr=0.0))
    net.train()
    x1, x2 = views(16, seed=3)
    before = [p.detach().clone() for p in net.parameters()]
    grads = [p.requires_grad for p in net.parameters()]
    if method == "dynacl":  # view 1 through the query net, view 2 through the key net
        x = torch.cat([x1, x2])
        adv = step.attack(x, torch.Generator().manual_seed(0))

        def objective(v):
            return step.loss(net.query(v[:16], "adv"), net.key(v[16:], "adv"))

        origin = x
    elif method == "acl":
        x = torch.cat([x1, x2])
        adv = step.attack(x, torch.Generator().manual_seed(0))

        def objective(v):
            return step.loss(net(v, "adv"))

        origin = x
    else:
        adv = step.attack(x1, x2, torch.Generator().manual_seed(0))

        def objective(v):
            return step.loss(torch.cat([net(v, "adv"), net(x2, "adv")]), 2)

        origin = x1
    assert net.training  # the attack ran in eval mode and restored the mode
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert grads == [p.requires_grad for p in net.parameters()]  # restored (DynACL's key net: none)
    eps = cfg.attack.eps
    assert (adv - origin).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert (adv - origin).abs().max() > eps / 2
    net.eval()
    with torch.no_grad():
        noise = (origin + eps * (2 * torch.rand(origin.shape, generator=torch.Generator().manual_seed(9)) - 1)).clamp(
            0, 1
        )
        assert objective(adv) > objective(noise) > 0.9 * objective(origin)


def test_lars_scales_each_layers_step_by_its_trust_ratio():
    """local = trust ||w|| / (||g|| + wd ||w||); buf = m buf + lr local (g + wd w); w -= buf."""
    w1 = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    w2 = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))  # ||w|| = 1
    opt = LARS([w1, w2], lr=2.0, momentum=0.5, weight_decay=0.1, trust=0.01)
    g1, g2 = torch.tensor([0.6, 0.8]), torch.tensor([0.0, 0.0, 2.0])  # ||g|| = 1 and 2
    bufs = []
    for w, g, wn, gn in ((w1, g1, 5.0, 1.0), (w2, g2, 1.0, 2.0)):
        local = 0.01 * wn / (gn + 0.1 * wn)
        bufs.append(2.0 * local * (g + 0.1 * w.detach()))
    expected = [w1.detach() - bufs[0], w2.detach() - bufs[1]]
    w1.grad, w2.grad = g1.clone(), g2.clone()
    opt.step()
    torch.testing.assert_close(w1.detach(), expected[0])
    torch.testing.assert_close(w2.detach(), expected[1])
    # second step: momentum carries the first buffer
    w1_before = w1.detach().clone()
    w1.grad = g1.clone()
    local = 0.01 * float(w1_before.norm()) / (1.0 + 0.1 * float(w1_before.norm()))
    buf = 0.5 * bufs[0] + 2.0 * local * (g1 + 0.1 * w1_before)
    opt.step()
    torch.testing.assert_close(w1.detach(), w1_before - buf)
    # a zero gradient takes a local ratio of 1 (no division by zero)
    w3 = torch.nn.Parameter(torch.tensor([1.0]))
    w3.grad = torch.zeros(1)
    LARS([w3], lr=1.0, momentum=0.0, weight_decay=0.5, trust=0.01).step()
    torch.testing.assert_close(w3.detach(), torch.tensor([0.5]))


@pytest.mark.parametrize("method", ["acl", "rocl", "dynacl"])
def test_a_step_of_each_method_makes_no_host_sync(method):
    """The CPU stand-in for torch.cuda.set_sync_debug_mode("error") (tests/sync_guard.py)
    around a whole step: attack, forwards, loss, LARS (and DynACL's EMA update)."""
    from sync_guard import NoHostSync

    cfg = getattr(PretrainConfig(), method)
    net = {"acl": tiny_acl, "rocl": tiny_rocl, "dynacl": tiny_dynacl}[method]().train()
    step = make_step(method, cfg, net, LARS(trained(method, net).parameters(), lr=0.5))
    if method == "dynacl":
        step.begin_epoch(5)  # a weight other than 1
    x1, x2 = views(8, seed=5)
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in net.parameters()]
    with NoHostSync():
        losses = step(x1, x2, g)
    assert set(losses) == {"loss", "loss_clean", "loss_adv"} and all(v.isfinite() for v in losses.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))  # it trained
