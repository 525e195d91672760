"""AMOC: Adversarial Momentum-Contrastive pre-training, as a reproducible pipeline."""

from __future__ import annotations

from amoc.version import __version__


def load_classifier(path):
    """Load a classifier written by `amoc probe` / `amoc finetune` as a plain nn.Module
    in eval mode: images in [0,1] (B x 3 x H x W) -> logits, adversarial BN branch."""
    from amoc.nets.classifier import load_classifier as _load

    return _load(path)


__all__ = ["load_classifier", "__version__"]
