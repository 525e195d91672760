"""The encoder starts from the authors' initialisation (docs/fidelity.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from amoc.nets import DualBatchNorm2d, build_encoder


def test_convolutions_are_kaiming_normal_fan_out_and_both_bn_branches_start_at_identity():
    torch.manual_seed(0)
    encoder = build_encoder(width=0.5)
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20  # stem, 16 in the blocks, 3 shortcuts
    for conv in convs:
        w = conv.weight.detach()
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        expected = math.sqrt(2.0 / fan_out)  # kaiming_normal_(mode="fan_out", nonlinearity="relu")
        if w.numel() >= 4096:  # enough draws for the sample std to sit within 5%
            assert w.std().item() == pytest.approx(expected, rel=0.05), conv
            assert abs(w.mean().item()) < 0.05 * expected
    duals = [m for m in encoder.modules() if isinstance(m, DualBatchNorm2d)]
    assert duals
    for dual in duals:
        for bn in (dual.clean, dual.adv):
            assert torch.equal(bn.weight, torch.ones_like(bn.weight))
            assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
