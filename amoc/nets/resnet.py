"""CIFAR ResNet-18 (3x3 stem, stride 1, no max-pool) with dual BatchNorm.

Input normalisation is part of the model, so callers (and attacks) work on images
in [0, 1]. `width` scales every stage's channels (1.0 = the paper's 64-128-256-512).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from amoc.data.prepared import CIFAR10_MEAN, CIFAR10_STD
from amoc.nets.dual_bn import DualBatchNorm2d


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = DualBatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = DualBatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), DualBatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Encoder(nn.Module):
    """Images in [0,1] (B x 3 x H x W) -> features (B x feature_dim) after global pooling."""

    def __init__(
        self,
        width: float = 1.0,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        blocks: Sequence[int] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        chans = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.width = width
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, chans[0], 3, 1, 1, bias=False)
        self.bn1 = DualBatchNorm2d(chans[0])
        layers, c_in = [], chans[0]
        for i, (c, n) in enumerate(zip(chans, blocks)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(c_in, c, stride if j == 0 else 1))
                c_in = c
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.feature_dim = chans[-1]
        for m in self.modules():  # the authors' init; BN weights 1 and biases 0 are torch's default
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def build_encoder(
    arch: str = "resnet18", width: float = 1.0, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
) -> Encoder:
    if arch != "resnet18":
        raise ValueError(f"unknown arch {arch!r}; only resnet18 is implemented")
    return Encoder(width=width, mean=mean, std=std)
