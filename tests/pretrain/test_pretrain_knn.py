"""k-NN monitor: weighted vote closed forms, the BN branch it reads, and the BN statistics
its random-weights baseline is measured under."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amoc.config import RuntimeConfig
from amoc.nets import build_encoder
from amoc.pretrain.knn import extract_features, knn_accuracy, knn_predict, training_statistics
from amoc.runtime import setup


def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_weighted_vote_beats_majority():
    """Two weak neighbours of class 0 (cos 0.1) against one close neighbour of class 1
    (cos 0.9): a majority vote says 0, the exp(cos/0.1) vote says 1 (e^9 > 2 e^1)."""
    a = 0.1
    train = torch.tensor([[a, (1 - a * a) ** 0.5, 0.0], [a, 0.0, (1 - a * a) ** 0.5], [0.9, (1 - 0.81) ** 0.5, 0.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[1.0, 0.0, 0.0]])
    assert knn_predict(train, labels, test, k=3, num_classes=2).tolist() == [1]
    # with a very flat weighting the vote is a majority vote
    assert knn_predict(train, labels, test, k=3, num_classes=2, temperature=100.0).tolist() == [0]


@pytest.mark.parametrize("k", [1, 3, 100])
def test_clusters_are_recovered(k):
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16)
    train_y = torch.arange(40) % 4
    train = F.normalize(centres[train_y] + 0.1 * torch.randn(40, 16, generator=g), dim=1)
    test_y = torch.arange(12) % 4
    test = F.normalize(centres[test_y] + 0.1 * torch.randn(12, 16, generator=g), dim=1)
    # k = 100 > N: capped at N, every sample votes; the near ones dominate the weights
    pred = knn_predict(train, train_y, test, k=k, num_classes=4, batch_size=5)
    assert torch.equal(pred, test_y)


def test_k1_is_nearest_neighbour():
    train = unit([1, 0], [0, 1], [-1, 0])
    labels = torch.tensor([2, 0, 1])
    test = unit([0.9, 0.1], [0.1, 0.9], [-1, -0.2])
    assert knn_predict(train, labels, test, k=1, num_classes=3).tolist() == [2, 0, 1]


def test_features_use_the_requested_branch_in_eval_mode():
    rt = setup(RuntimeConfig(device="cpu", precision="fp32", progress=False), seed=0)  # atol 1e-6 below
    enc = build_encoder(width=0.0625).train()
    with torch.no_grad():
        for name, buf in enc.named_buffers():
            if name.endswith("adv.running_mean"):
                buf.add_(0.3)  # only the adv branch's statistics differ
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    clean = extract_features(enc, x, "clean", rt, batch_size=4)
    adv = extract_features(enc, x, "adv", rt)
    assert clean.shape == (6, enc.feature_dim)
    assert torch.allclose(clean.norm(dim=1), torch.ones(6))
    assert not torch.allclose(clean, adv)
    assert enc.training and all(m.branch == "clean" for m in enc.modules() if hasattr(m, "branch"))
    # eval mode: a sample's feature does not depend on the rest of its batch
    assert torch.allclose(extract_features(enc, x[:1], "clean", rt), clean[:1], atol=1e-6)
    acc = knn_accuracy(enc, (x, torch.arange(6) % 2), (x, torch.arange(6) % 2), k=1, branch="clean", rt=rt)
    assert acc == 1.0  # each test image finds itself


def test_training_statistics_are_the_views_and_everything_is_put_back():
    rt = setup(RuntimeConfig(device="cpu", precision="fp32", progress=False), seed=0)
    enc = build_encoder(width=0.0625, mean=[0.5] * 3, std=[0.25] * 3).train()
    with torch.no_grad():
        for name, buf in enc.named_buffers():
            if name.endswith("running_var"):
                buf.mul_(2.0)  # statistics a trained encoder could hold: they must come back
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    views = [torch.rand(5, 3, 16, 16, generator=g) * (i + 1) for i in range(3)]  # batches of different scales
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    with training_statistics(enc, views, "adv", rt) as recalibrated:
        assert recalibrated is enc and not enc.training
        bn = enc.bn1.adv
        # the first BN sees conv1's output: its running mean is the plain average of the batches' means
        batch_means = [enc.conv1(enc.normalize(x)).mean(dim=(0, 2, 3)) for x in views]
        assert torch.allclose(bn.running_mean, torch.stack(batch_means).mean(0), atol=1e-5)
        inside = {k: v.clone() for k, v in enc.state_dict().items()}
        features = extract_features(enc, images, "adv", rt)
    for k, v in enc.state_dict().items():
        if ".clean." in k or not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(inside[k], before[k]), k  # weights and the other branch: untouched
        assert torch.equal(v, before[k]), k  # and afterwards everything is as it was
    assert enc.training and all(m.momentum == 0.1 for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(features, extract_features(enc, images, "adv", rt))
    with training_statistics(enc, views[::-1], "adv", rt):  # the order of the batches does not matter
        assert torch.allclose(enc.state_dict()["bn1.adv.running_var"], inside["bn1.adv.running_var"], atol=1e-5)
