"""Pieces the benchmark scripts share: the machine's name and the per-image PIL
reference pipeline (torchvision's SimCLR transforms with the authors' PIL Gaussian blur,
as the authors' loader runs them)."""

from __future__ import annotations

import random

from amoc.runtime import cpu_name  # noqa: F401  (the scripts import it from here)


class PILGaussianBlur:
    """The authors' blur: PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` with sigma
    drawn uniformly from ``sigma`` for every image (Python's ``random``, as their loader)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img):
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def pil_pipeline():
    """The MoCo/SimCLR CIFAR transform, image by image on PIL images; the blur is PIL's
    own full-support GaussianBlur (docs/pretrain.md), not torchvision's 3-tap GaussianBlur."""
    import torchvision.transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.2, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
            T.ToTensor(),
        ]
    )
