"""The attack toolkit: PGD's projection and data-parallel start, the CE objective, and the
one batched correctness count every evaluation path uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amoc.attacks.accuracy import correct, percent
from amoc.attacks.ce import ce_pgd
from amoc.attacks.pgd import global_start, pgd, pgd_linf
from amoc.config import AttackConfig, RuntimeConfig
from amoc.distributed import Shard
from amoc.errors import DataError
from amoc.nets import build_encoder
from amoc.nets.classifier import Classifier
from amoc.runtime import setup

ATTACK = AttackConfig(eps=8 / 255, step_ratio=0.25, steps=3, random_start=True)


@pytest.fixture(scope="module")
def model() -> Classifier:
    torch.manual_seed(0)
    m = Classifier(build_encoder(width=0.0625), 4).eval().requires_grad_(False)
    with torch.no_grad():
        m.head.weight.normal_()  # a zero head has zero input gradients
    return m


def images(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_explicit_start_is_projected_into_the_ball():
    x, _ = images()
    out = pgd_linf(x, lambda z: z.sum() * 0, eps=4 / 255, step_size=1 / 255, steps=1, start=x + 0.5)
    assert (out - x).abs().max() <= 4 / 255 + 1e-6 and out.max() <= 1


def test_ce_pgd_raises_the_loss(model):
    x, y = images(32)
    x_adv = ce_pgd(model, x, y, AttackConfig(eps=8 / 255, step_ratio=0.25, steps=5, random_start=False))
    assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_single_process_start_is_pgds_own_draw(model):
    """One process: no explicit start (None), so pgd() equals pgd_linf's own uniform start."""
    x, y = images()
    assert global_start(x, ATTACK, torch.Generator(), Shard()) is None
    ours = ce_pgd(model, x, y, ATTACK, torch.Generator().manual_seed(3))
    objective = lambda z: F.cross_entropy(model(z), y, reduction="sum")  # noqa: E731
    plain = pgd_linf(
        x,
        objective,
        eps=ATTACK.eps,
        step_size=ATTACK.step_size,
        steps=ATTACK.steps,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_starts_are_the_rows_of_one_global_draw(views, world):
    """Every rank's start is its rows of the single-process start of the global batch, view by view."""
    total = 7  # rows per view in the global batch (uneven over 2 and 3 ranks)
    x_global = torch.rand(views, total, 3, 4, 4)
    noise = torch.rand((views, total, 3, 4, 4), generator=torch.Generator().manual_seed(5))
    expected = x_global + (2 * noise - 1) * ATTACK.eps  # views x total x ...
    for rank in range(world):
        shard = Shard(rank, world, total)
        local = shard.rows(x_global, dim=1)  # views x rows x ...
        start = global_start(local.reshape(-1, 3, 4, 4), ATTACK, torch.Generator().manual_seed(5), shard, views)
        assert torch.equal(start.reshape(local.shape), shard.rows(expected, dim=1))


def test_no_start_when_the_attack_draws_nothing():
    x, _ = images()
    for attack in (AttackConfig(eps=0.0, steps=3), AttackConfig(steps=0), AttackConfig(random_start=False)):
        assert global_start(x, attack, torch.Generator(), Shard(0, 2, 24)) is None
    assert torch.equal(pgd(x, lambda z: z.sum(), AttackConfig(steps=0)), x)


def test_correct_is_the_same_for_uint8_float_and_nhwc_numpy(model):
    rt = setup(RuntimeConfig(device="cpu", progress=False), 0)
    x8 = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    y = model(x8.float() / 255).argmax(1)
    y[:3] = (y[:3] + 1) % 4  # three wrong labels
    expected = torch.tensor([False] * 3 + [True] * 7)
    nhwc = np.ascontiguousarray(x8.numpy().transpose(0, 2, 3, 1))
    nhwc.setflags(write=False)  # like a read-only memory map
    for got in (
        correct(model, x8, y, rt, 4),
        correct(model, x8.float() / 255, y, rt, 3),
        correct(model, nhwc, y.numpy(), rt, 4, layout="NHWC"),
    ):
        assert torch.equal(got, expected)
    assert percent(expected) == pytest.approx(70.0) and percent(torch.zeros(0, dtype=torch.bool)) == 0.0


def test_correct_applies_the_attack_and_refuses_foreign_labels(model):
    rt = setup(RuntimeConfig(device="cpu", progress=False), 0)
    x, _ = images(6)
    y = model(x).argmax(1)
    wrong = correct(model, x, y, rt, 4, attack=lambda xb, yb: torch.zeros_like(xb))  # every image -> black
    assert torch.equal(wrong, model(torch.zeros_like(x)).argmax(1) == y)
    with pytest.raises(DataError, match="predicts 4 classes but a label is 7"):
        correct(model, x, torch.full((6,), 7), rt, 4)
