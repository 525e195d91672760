"""info_nce against closed forms, and the variant table."""

from __future__ import annotations

import math

import pytest
import torch
from pretrain_utils import ALL_VARIANTS

from amoc.pretrain.losses import info_nce
from amoc.pretrain.variants import Variant


def scaled(x: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=dim) / math.sqrt(temperature)


def test_hand_computed_example():
    # T = 1 so the logits are the plain dot products.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # D x K, columns are keys
    # sample 0: logits [0.6, 1, 0, -1]; sample 1: logits [1, 0, 1, 0]
    l0 = -0.6 + math.log(math.exp(0.6) + math.exp(1) + 1 + math.exp(-1))
    l1 = -1 + math.log(2 * math.e + 2)
    assert info_nce(q, k, queue).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert info_nce(q, k, queue, reduction="sum").item() == pytest.approx(l0 + l1, rel=1e-6)


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("size", [1, 7, 64])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_aligned_embeddings_with_orthogonal_negatives(batch, size, temperature):
    """q = k and every negative orthogonal to q: logits [1/T, 0, ..., 0], so
    loss = -log(e^{1/T} / (e^{1/T} + K))."""
    dim = batch + size
    eye = torch.eye(dim)
    q = scaled(eye[:batch], temperature, 1)  # B x D, unit / sqrt(T)
    queue = scaled(eye[:, batch:], temperature, 0)  # D x K, orthogonal to every query
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + size))
    assert info_nce(q, q.clone(), queue).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)  # fp32 near 0


@pytest.mark.parametrize("temperature", [0.1, 0.2, 0.5])
def test_uniform_negatives_identical_to_key(temperature):
    """Every negative equal to the positive: K+1 equal logits, loss = log(K + 1)."""
    g = torch.Generator().manual_seed(0)
    q = scaled(torch.randn(5, 8, generator=g), temperature, 1)
    k = scaled(torch.randn(5, 8, generator=g), temperature, 1)
    for size in (1, 9):
        queue = k[:1].t().repeat(1, size)  # only valid for sample 0
        assert info_nce(q[:1], k[:1], queue).item() == pytest.approx(math.log(size + 1), rel=1e-5)


def test_gradient_pulls_query_towards_key():
    g = torch.Generator().manual_seed(1)
    q = scaled(torch.randn(4, 8, generator=g), 0.2, 1).requires_grad_(True)
    k = scaled(torch.randn(4, 8, generator=g), 0.2, 1)
    queue = scaled(torch.randn(8, 32, generator=g), 0.2, 0)
    info_nce(q, k, queue).backward()
    # a small step against the gradient raises every positive logit's share
    with torch.no_grad():
        before = torch.softmax(torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1), 1)[:, 0]
        q2 = q - 0.01 * q.grad
        after = torch.softmax(torch.cat([(q2 * k).sum(1, keepdim=True), q2 @ queue], 1), 1)[:, 0]
    assert bool((after > before).all())


def test_bf16_autocast_still_fp32():
    g = torch.Generator().manual_seed(2)
    q = scaled(torch.randn(4, 8, generator=g), 0.2, 1)
    k = scaled(torch.randn(4, 8, generator=g), 0.2, 1)
    queue = scaled(torch.randn(8, 16, generator=g), 0.2, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(q, k, queue)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(info_nce(q, k, queue).item(), rel=1e-6)


# --------------------------------------------------------------------------- variants
TABLE = {  # name: (has L_adv, negatives, what enters queue_adv, encoder BN branch)
    "CCC": (False, "clean", "none", "clean"),
    "CAC": (True, "clean", "adv_keys", "clean"),
    "CAA": (True, "adv", "adv_keys", "clean"),
    "ACC": (True, "clean", "none", "adv"),
    "ACA": (True, "adv", "none", "adv"),
    "ACA+": (True, "adv", "adv_query_keys", "adv"),
    "AAC": (True, "clean", "adv_keys", "adv"),
    "AAA": (True, "adv", "adv_keys", "adv"),
}


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_variant_table(name):
    v = Variant.parse(name)
    assert (v.has_adv_loss, v.negatives, v.adv_enqueue, v.encoder_bn_branch) == TABLE[name]
    assert v.writes_queue_adv == (TABLE[name][2] != "none")
    assert (v.adv_query, v.adv_key, v.adv_queue) == tuple(c == "A" for c in name[:3])


@pytest.mark.parametrize("spelling", ["ACA+", "aca+", "ACA_PLUS", "aca_plus", "ACA-PLUS"])
def test_aca_plus_spellings(spelling):
    assert Variant.parse(spelling) == Variant.parse("ACA+")
    assert Variant.parse(spelling).plus_enqueue


def test_unknown_variant():
    with pytest.raises(ValueError, match="CCC, CAC"):
        Variant.parse("ABC")
    with pytest.raises(ValueError):
        Variant.parse("CCA")  # not one of the paper's eight
