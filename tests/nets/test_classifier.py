"""The downstream classifier: zero-initialised head, adversarial BN branch, file format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import amoc
from amoc.errors import CheckpointError
from amoc.nets import DualBatchNorm2d, build_encoder, set_bn_branch
from amoc.nets.classifier import CLASSIFIER_FORMAT, Classifier, load_classifier, read_classifier, save_classifier
from amoc.nets.store import save_encoder


def tiny(branch: str = "adv", seed: int = 0, num_classes: int = 4) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(build_encoder(width=0.0625), num_classes, branch)


def distinct_branches(model: Classifier, seed: int = 1) -> Classifier:
    """Give the two BN branches different affine parameters and running statistics, and
    the head non-zero weights, so that the logits reveal which branch ran."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.encoder.modules():
            if isinstance(m, DualBatchNorm2d):
                for bn in (m.clean, m.adv):
                    bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=g))
                    bn.bias.copy_(0.2 * torch.randn(bn.bias.shape, generator=g))
                    bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=g))
                    bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
        model.head.weight.normal_(generator=g)
        model.head.bias.normal_(generator=g)
    return model


def images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("train", [False, True])
def test_zero_initialised_head_gives_uniform_logits(train):
    model = tiny().train(train)
    logits = model(images())
    assert logits.shape == (6, 4)
    assert torch.equal(logits, torch.zeros_like(logits))
    probs = logits.softmax(1)
    assert torch.allclose(probs, torch.full_like(probs, 0.25))


@pytest.mark.parametrize("branch", ["adv", "clean"])
def test_forward_runs_only_the_chosen_bn_branch(branch):
    model = tiny(branch).eval()
    calls = {"clean": 0, "adv": 0}
    for m in model.encoder.modules():
        if isinstance(m, DualBatchNorm2d):
            m.clean.register_forward_hook(lambda *_: calls.__setitem__("clean", calls["clean"] + 1))
            m.adv.register_forward_hook(lambda *_: calls.__setitem__("adv", calls["adv"] + 1))
    other = "clean" if branch == "adv" else "adv"
    set_bn_branch(model, other)  # a stray switch must not change what the classifier runs
    model(images())
    n_dual = sum(isinstance(m, DualBatchNorm2d) for m in model.modules())
    assert calls[branch] == n_dual and calls[other] == 0


def test_default_branch_is_adv_and_differs_from_clean():
    adv = distinct_branches(tiny("adv")).eval()
    clean = tiny("clean").eval()
    clean.load_state_dict(adv.state_dict())
    x = images()
    assert adv.bn_branch == "adv"
    assert not torch.allclose(adv(x), clean(x))


def test_round_trip_gives_identical_logits(tmp_path):
    model = distinct_branches(tiny()).eval()
    path = tmp_path / "classifier.pt"
    save_classifier(path, model, {"stage": "probe", "mode": "slf"})
    loaded, provenance = read_classifier(path)
    assert not loaded.training and all(not m.training for m in loaded.modules())
    assert next(loaded.parameters()).device.type == "cpu"
    assert provenance == {"stage": "probe", "mode": "slf"}
    assert loaded.bn_branch == "adv" and loaded.num_classes == 4
    x = images()
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(amoc.load_classifier(path)(x), model(x))  # the public entry point


def test_loaded_classifier_works_with_a_third_party_attack(tmp_path):
    import torchattacks

    path = tmp_path / "classifier.pt"
    save_classifier(path, distinct_branches(tiny()).eval())
    model = load_classifier(path)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    adv = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=2)(x, y)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and not model.training


def _touch_marker(path: str) -> None:  # what a malicious pickle would run
    Path(path).write_text("code ran")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch_marker, (self.marker,))


def test_refuses_a_checkpoint_with_pickled_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"format": CLASSIFIER_FORMAT, "state_dict": {}, "provenance": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_classifier(path)
    assert not marker.exists()


def test_refuses_wrong_missing_or_corrupt_files(tmp_path):
    encoder_file = tmp_path / "encoder.pt"
    save_encoder(encoder_file, build_encoder(width=0.0625))
    with pytest.raises(CheckpointError, match="not an amoc classifier"):
        load_classifier(encoder_file)
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    save_classifier(good, tiny())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_classifier(truncated)
    blob = torch.load(good, weights_only=True)
    blob["num_classes"] = 7  # head shape no longer matches the weights
    mismatched = tmp_path / "mismatched.pt"
    torch.save(blob, mismatched)
    with pytest.raises(CheckpointError, match="damaged"):
        load_classifier(mismatched)
