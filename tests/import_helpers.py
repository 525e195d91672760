"""Released-checkpoint layouts written out by hand from the official code (the AMOC
authors' models/, ACL's and DynACL's models/resnet_multi_bn.py), with random values, and
a reference forward of each: shared by tests/nets/test_import_encoder.py and
tests/pretrain/test_pretrain_import.py."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

CIFAR10 = ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2617))  # the authors' src/config.py
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ACL's and DynACL's normalize buffers
# The file's BN child names per layout: (clean, adversarial)
BN_NAMES = {"authors": ("bn_clean", "bn_adv"), "acl": ("bn_list.0", "bn_list.1"), "dynacl": ("bn_list.0", "bn_list.1")}
SHORTCUT = {"authors": ("downsample.0", "downsample.1"), "acl": ("downsample.conv", "downsample.bn")}
SHORTCUT["dynacl"] = SHORTCUT["acl"]


# --------------------------------------------------------------------------- source layouts
def _bn(state: dict, name: str, c: int, layout: str, g: torch.Generator) -> None:
    for child in BN_NAMES[layout]:
        state[f"{name}.{child}.weight"] = 0.5 + torch.rand(c, generator=g)
        state[f"{name}.{child}.bias"] = 0.1 * torch.randn(c, generator=g)
        state[f"{name}.{child}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        state[f"{name}.{child}.running_var"] = 0.5 + torch.rand(c, generator=g)
        state[f"{name}.{child}.num_batches_tracked"] = torch.tensor(1000)


def _conv(c_out: int, c_in: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(c_out, c_in, k, k, generator=g) * (2.0 / (c_in * k * k)) ** 0.5


def resnet18_state(layout: str, width: float = 1.0, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """The CIFAR ResNet-18 of the layout's models/ code: conv1, bn1, layer1..4 of two
    BasicBlocks (conv1, bn1, conv2, bn2, a downsample conv + BN where the shape changes)."""
    g = torch.Generator().manual_seed(seed)
    chans = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    if layout != "authors":  # NormalizeByChannelMeanStd(ImageNet) inside ACL's ResNet
        state["normalize.mean"] = torch.tensor(IMAGENET[0])
        state["normalize.std"] = torch.tensor(IMAGENET[1])
    state["conv1.weight"] = _conv(chans[0], 3, 3, g)
    _bn(state, "bn1", chans[0], layout, g)
    c_in = chans[0]
    for i, c in enumerate(chans):
        for j in range(2):
            p = f"layer{i + 1}.{j}"
            stride = 2 if (i > 0 and j == 0) else 1
            state[f"{p}.conv1.weight"] = _conv(c, c_in, 3, g)
            _bn(state, f"{p}.bn1", c, layout, g)
            state[f"{p}.conv2.weight"] = _conv(c, c, 3, g)
            _bn(state, f"{p}.bn2", c, layout, g)
            if stride != 1 or c_in != c:
                conv, bn = SHORTCUT[layout]
                state[f"{p}.{conv}.weight"] = _conv(c, c_in, 1, g)
                _bn(state, f"{p}.{bn}", c, layout, g)
            c_in = c
    return state


def acl_projector(state: dict, width: float = 1.0, seed: int = 1) -> None:
    """ACL's proj_head as `fc`: fc1 (bias), bn1, fc2, bn2, fc3, bn3, every BN dual (bn_list)."""
    g = torch.Generator().manual_seed(seed)
    ch = max(1, round(512 * width))
    for i in (1, 2, 3):
        state[f"fc.fc{i}.weight"] = torch.randn(ch, ch, generator=g)
        if i == 1:
            state["fc.fc1.bias"] = torch.randn(ch, generator=g)
        _bn(state, f"fc.bn{i}", ch, "acl", g)


def authors_moco(width: float = 1.0, k: int = 64) -> "OrderedDict[str, torch.Tensor]":
    """The authors' whole MoCo (models/builder.py): both encoders, both projectors
    (Linear -> ReLU -> Linear as `head`), both queues and their pointers."""
    feature = max(1, round(512 * width))
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, seed in (("encoder_q", 0), ("encoder_k", 5)):
        out.update({f"{name}.{key}": v for key, v in resnet18_state("authors", width, seed).items()})
    for name in ("projector_q", "projector_k"):
        out[f"{name}.head.0.weight"] = torch.randn(feature, feature)
        out[f"{name}.head.0.bias"] = torch.randn(feature)
        out[f"{name}.head.2.weight"] = torch.randn(128, feature)
        out[f"{name}.head.2.bias"] = torch.randn(128)
    for queue in ("queue_clean", "queue_adv"):
        out[queue] = F.normalize(torch.randn(128, k), dim=0)
        out[f"{queue}_ptr"] = torch.zeros(1, dtype=torch.long)
    return out


def reference_features(state: dict, layout: str, branch: str, x: torch.Tensor) -> torch.Tensor:
    """The source network's forward, eval mode, on BN child `branch` (0 = clean, 1 = adv):
    normalisation (outside the network for the authors, the file's buffers for ACL),
    conv1 -> bn -> relu, four stages of BasicBlocks, global average pooling."""
    child = BN_NAMES[layout][branch == "adv"]

    def bn(x, name):
        s = lambda p: state[f"{name}.{child}.{p}"]  # noqa: E731
        return F.batch_norm(x, s("running_mean"), s("running_var"), s("weight"), s("bias"), False, 0.0, 1e-5)

    if layout == "authors":
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR10)
    else:
        mean, std = state["normalize.mean"].view(1, 3, 1, 1), state["normalize.std"].view(1, 3, 1, 1)
    out = F.relu(bn(F.conv2d((x - mean) / std, state["conv1.weight"], padding=1), "bn1"))
    conv_name, bn_name = SHORTCUT[layout]
    for i in range(4):
        for j in range(2):
            p = f"layer{i + 1}.{j}"
            stride = 2 if (i > 0 and j == 0) else 1
            h = F.relu(bn(F.conv2d(out, state[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            h = bn(F.conv2d(h, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.{conv_name}.weight" in state:
                out = bn(F.conv2d(out, state[f"{p}.{conv_name}.weight"], stride=stride), f"{p}.{bn_name}")
            out = F.relu(h + out)
    return out.mean(dim=(2, 3))
