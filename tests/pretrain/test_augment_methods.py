"""The augmentation knobs of the baselines (docs/methods.md): ACL's bicubic crop with
scale 0.1-1 and no blur, RoCL's colour-before-crop order with scale 0.08-1, checked
against torchvision per sample and by their drawn parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from amoc.config import AugmentConfig, PretrainConfig
from amoc.pretrain.augment import SimCLRAugment


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Float images in [0.1, 0.9] with smooth content: bicubic stays inside [0, 1]."""
    g = gen(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").mul_(0.8).add_(0.1)


def colour(out: torch.Tensor, p: dict, i: int) -> torch.Tensor:
    if p["jitter"][i]:
        for op in p["order"][i].tolist():
            if op == 0:
                out = F.adjust_brightness(out, float(p["brightness"][i]))
            elif op == 1:
                out = F.adjust_contrast(out, float(p["contrast"][i]))
            elif op == 2:
                out = F.adjust_saturation(out, float(p["saturation"][i]))
            elif float(p["hue"][i]) != 0.0:
                out = F.adjust_hue(out, float(p["hue"][i]))
    if p["gray"][i]:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    return out


def crop(img: torch.Tensor, p: dict, i: int, size: int, mode: InterpolationMode) -> torch.Tensor:
    box = (int(p["top"][i]), int(p["left"][i]), int(p["height"][i]), int(p["width"][i]))
    out = F.resized_crop(img, *box, [size, size], interpolation=mode, antialias=True)
    return F.horizontal_flip(out) if p["flip"][i] else out


@pytest.mark.parametrize("shape", [(32, 32), (64, 48)])
def test_bicubic_crop_matches_torchvision(shape):
    cfg = PretrainConfig().acl.augment
    x = smooth(32, size=max(shape))[..., : shape[0], : shape[1]].contiguous()
    aug = SimCLRAugment(cfg, size=32)
    p = aug.sample_params(32, gen(1), height=shape[0], width=shape[1])
    for key in ("jitter", "gray"):
        p[key] = torch.zeros(32, dtype=torch.bool)
    ref = torch.stack([crop(x[i], p, i, 32, InterpolationMode.BICUBIC) for i in range(32)]).clamp(0, 1)
    torch.testing.assert_close(aug.apply_params(x, p), ref, rtol=0, atol=2e-6)
    bilinear = SimCLRAugment(dataclasses.replace(cfg, interpolation="bilinear")).apply_params(x, p)
    assert (bilinear - ref).abs().max() > 1e-3  # the filter really changed


def test_colour_first_order_matches_torchvision():
    """RoCL: ColorJitter, RandomGrayscale, RandomHorizontalFlip, RandomResizedCrop."""
    cfg = PretrainConfig().rocl.augment
    x = (smooth(48, seed=2) * 255).round().to(torch.uint8)
    aug = SimCLRAugment(cfg)
    p = aug.sample_params(48, gen(5))
    out = aug.apply_params(x, p)
    ref = [crop(colour(x[i].float() / 255, p, i), p, i, 32, InterpolationMode.BILINEAR) for i in range(48)]
    torch.testing.assert_close(out, torch.stack(ref), rtol=0, atol=2e-5)
    crop_first = SimCLRAugment(dataclasses.replace(cfg, order="crop_first")).apply_params(x, p)
    assert (crop_first - out).abs().max() > 1e-3  # contrast reads the whole image's mean: the order matters


@pytest.mark.parametrize("method,scale", [("acl", 0.1), ("rocl", 0.08)])
def test_the_methods_draw_their_crop_scales_probabilities_and_no_blur(method, scale):
    cfg: AugmentConfig = getattr(PretrainConfig(), method).augment
    n = 20000
    p = SimCLRAugment(cfg).sample_params(n, gen(7))
    area = (p["height"] * p["width"]).float() / (32 * 32)
    assert area.min() >= scale - 0.01 and area.max() <= 1.0
    assert (area < 0.2).float().mean() > 0.05  # below AMOC's lower bound, often
    for key, expected in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.0)):
        assert p[key].float().mean().item() == pytest.approx(expected, abs=0.015), key
    assert not SimCLRAugment(cfg).use_blur
