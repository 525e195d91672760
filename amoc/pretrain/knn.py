"""k-NN monitor: how well the encoder's features separate classes, without training.

Features are the encoder's pooled features (the part kept for downstream use, not the
projector's output), L2-normalised, of clean, un-augmented images, with the encoder
in eval mode on one BN branch. Each test image takes the k training images with the
highest cosine similarity and a weighted vote, weight exp(cos / 0.1) per neighbour,
as in the InstDisc / MoCo CIFAR demos (ties between classes go to the lower label).
Everything runs batched on the features' device.

The baseline a trained encoder must beat is the same network at its random
initialisation, measured twice: as initialised (BN at its initial statistics, mean 0 and
variance 1, so a plain random ReLU network: MoCo's monitor before training), and with
the same random weights but BN statistics of the training views (:func:`training_statistics`),
which is how every trained encoder runs. The two differ a lot (docs/results.md: 84-89
against 57-70 % on the embedded digits); only the second tells what the learnt weights add.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from amoc.nets import bn_branch
from amoc.nets.dual_bn import Branch, DualBatchNorm, other_branch
from amoc.runtime import Runtime, eval_mode

VOTE_TEMPERATURE = 0.1


@contextlib.contextmanager
def training_statistics(
    encoder: nn.Module, views: Iterable[torch.Tensor], branch: Branch, rt: Runtime
) -> Iterator[nn.Module]:
    """Run a block with `encoder`'s BN layers of `branch` (the other branch stays as it
    is) holding the statistics of `views` (batches of float images in [0, 1], as the
    encoder takes them), then put back what they held. The weights are not touched. The
    statistics are a cumulative average over the batches (momentum None), so they do not
    depend on the batches' order. Every BN runs in training mode meanwhile: a distributed
    BN then all-reduces, so under torchrun every rank must call this with the same number
    and shapes of batches."""
    idle = {id(getattr(m, other_branch(branch))) for m in encoder.modules() if isinstance(m, DualBatchNorm)}
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in idle]
    saved = [(m.momentum, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in norms]
    flags = [m.training for m in encoder.modules()]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        encoder.train()
        with torch.no_grad(), bn_branch(encoder, branch):
            for x in views:
                with rt.autocast():
                    encoder(x)
        encoder.eval()
        yield encoder
    finally:
        for m, (momentum, buffers) in zip(norms, saved):
            m.momentum = momentum
            with torch.no_grad():
                for k, b in m.named_buffers(recurse=False):
                    b.copy_(buffers[k])
        for m, flag in zip(encoder.modules(), flags):
            m.training = flag


@torch.no_grad()
def extract_features(
    encoder: nn.Module, images: torch.Tensor, branch: Branch, rt: Runtime, batch_size: int = 1024
) -> torch.Tensor:
    """uint8 N x 3 x H x W (any device) -> N x D unit-norm fp32 features on rt.device."""
    feats = []
    with eval_mode(encoder), bn_branch(encoder, branch):
        for chunk in images.split(batch_size):
            x = rt.images(chunk.to(rt.device).float().div_(255))
            with rt.autocast():
                feats.append(F.normalize(encoder(x).float(), dim=1))
    return torch.cat(feats)


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    k: int,
    num_classes: int,
    temperature: float = VOTE_TEMPERATURE,
    batch_size: int = 512,
) -> torch.Tensor:
    """Weighted k-NN labels (M) of unit-norm test features (M x D) against unit-norm
    training features (N x D) with labels (N); k is capped at N."""
    k = min(k, train_features.shape[0])
    train_labels = train_labels.to(train_features.device)
    preds = []
    for chunk in test_features.split(batch_size):
        sim = chunk @ train_features.t()  # b x N cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # b x k
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)  # b x C
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(
    encoder: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    k: int,
    branch: Branch,
    rt: Runtime,
    num_classes: int | None = None,
) -> float:
    """Top-1 k-NN accuracy (a fraction in [0, 1]) of the clean test set."""
    (train_x, train_y), (test_x, test_y) = train, test
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_f = extract_features(encoder, train_x, branch, rt)
    test_f = extract_features(encoder, test_x, branch, rt)
    preds = knn_predict(train_f, train_y, test_f, k=k, num_classes=num_classes)
    return (preds == test_y.to(preds.device)).float().mean().item()
