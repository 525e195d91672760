"""Downstream losses, training-time attacks and the standard augmentation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amoc.attacks.ce import ce_pgd
from amoc.attacks.pgd import pgd_linf
from amoc.config import AttackConfig
from amoc.downstream.augment import crop_flip
from amoc.downstream.losses import trades_attack, trades_kl, trades_loss
from amoc.nets import build_encoder
from amoc.nets.classifier import Classifier


@pytest.fixture(scope="module")
def model() -> Classifier:
    torch.manual_seed(0)
    m = Classifier(build_encoder(width=0.0625), 4).eval()
    with torch.no_grad():
        m.head.weight.normal_()  # a zero head has zero input gradients
    return m


def batch(n: int = 8, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = 0.0  # pixels on both edges of [0, 1]: the projection must clip them
    x[1] = 1.0
    return x, torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_trades_loss_is_cross_entropy_when_x_adv_equals_x(model, beta):
    x, y = batch()
    logits = model(x)
    assert torch.allclose(trades_kl(logits, model(x.clone())), torch.zeros(()), atol=1e-7)
    assert torch.allclose(trades_loss(logits, model(x.clone()), y, beta), F.cross_entropy(logits, y), atol=1e-6)


def test_trades_kl_is_batchmean_kl_of_natural_to_adversarial():
    g = torch.Generator().manual_seed(0)
    nat, adv = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    p, q = nat.softmax(1), adv.softmax(1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(trades_kl(nat, adv), expected, atol=1e-6)
    assert trades_kl(nat, adv) > 0


@pytest.mark.parametrize("eps_255", [0, 2, 8, 16])
@pytest.mark.parametrize("kind", ["ce", "trades", "pgd_random_objective"])
def test_attacks_stay_in_the_eps_ball_and_in_0_1(model, eps_255, kind):
    x, y = batch()
    attack = AttackConfig(eps=eps_255 / 255, step_ratio=0.5, steps=4, random_start=True)
    g = torch.Generator().manual_seed(1)
    if kind == "ce":
        x_adv = ce_pgd(model, x, y, attack, g)
    elif kind == "trades":
        x_adv = trades_attack(model, x, attack, g)
    else:
        w = torch.randn(x.shape, generator=g)
        x_adv = pgd_linf(
            x, lambda z: (z * w).sum(), eps=attack.eps, step_size=attack.step_size, steps=attack.steps, generator=g
        )
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= attack.eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if eps_255 and kind == "pgd_random_objective":  # a linear objective drives every free pixel to the border
        free = (x > attack.eps) & (x < 1 - attack.eps)
        assert torch.allclose((x_adv - x).abs()[free], torch.tensor(attack.eps), atol=1e-6)


def test_crop_flip_identity_and_pure_flip():
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(crop_flip(x, g, pad=0, flip_p=0.0), x.float() / 255)
    assert torch.equal(crop_flip(x, g, pad=0, flip_p=1.0), x.flip(3).float() / 255)


def test_crop_flip_outputs_are_reflect_padded_crops_drawn_per_sample():
    """Crops of the image padded as the authors pad it: torchvision's Pad(4, reflect)."""
    from torchvision.transforms import v2

    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = crop_flip(x, torch.Generator().manual_seed(3), pad=4)
    assert out.dtype == torch.float32 and out.shape == x.shape
    padded = v2.Pad(4, padding_mode="reflect")(x).float() / 255
    assert not torch.equal(padded, F.pad(x, (4, 4, 4, 4)).float() / 255)
    found = set()
    for i in range(len(x)):
        matches = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy : dy + 8, dx : dx + 8]))
        ]
        assert matches, f"sample {i} is not a crop of its padded image"
        found.add(matches[0])
    assert len(found) > 4  # offsets and flips differ between samples
    again = crop_flip(x, torch.Generator().manual_seed(3), pad=4)
    assert torch.equal(out, again)  # seeded


@pytest.mark.parametrize("start", ["uniform", "normal"])
def test_trades_start(model, monkeypatch, start):
    """uniform (the authors' foolbox LinfPGDKLDiv): the first iterate spreads over the
    eps-ball; normal (the TRADES code): x + 0.001 * N(0, 1)."""
    import amoc.downstream.losses as losses

    seen = {}
    real = losses.pgd_linf
    monkeypatch.setattr(losses, "pgd_linf", lambda x, objective, **kw: seen.update(kw) or real(x, objective, **kw))
    x, _ = batch(64)
    attack = AttackConfig(eps=8 / 255, step_ratio=0.25, steps=1)
    trades_attack(model, x, attack, torch.Generator().manual_seed(0), start=start)
    delta = seen["start"] - x
    if start == "uniform":
        assert delta.abs().max() <= attack.eps + 1e-7
        assert delta.std().item() == pytest.approx(attack.eps / 3**0.5, rel=0.05)  # U(-eps, eps)
    else:
        assert delta.std().item() == pytest.approx(0.001, rel=0.05)
