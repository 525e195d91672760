"""The in-memory result of every reader: train/test arrays plus class names."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Splits:
    classes: list[str]
    train_x: np.ndarray  # N x 3 x H x W uint8
    train_y: np.ndarray  # N int64
    test_x: np.ndarray
    test_y: np.ndarray

    def __post_init__(self) -> None:
        # Readers validate user data themselves; these are invariants of our own code.
        for x, y in ((self.train_x, self.train_y), (self.test_x, self.test_y)):
            assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1] == 3, (x.dtype, x.shape)
            assert y.dtype == np.int64 and y.shape == (x.shape[0],), (y.dtype, y.shape)
        assert self.train_x.shape[1:] == self.test_x.shape[1:] or len(self.test_x) == 0

    def limited(self, train_limit: int, test_limit: int) -> "Splits":
        """Keep the first N images of each split (0 = all)."""
        tr = slice(None, train_limit or None)
        te = slice(None, test_limit or None)
        return Splits(self.classes, self.train_x[tr], self.train_y[tr], self.test_x[te], self.test_y[te])

    def per_class(self, split: str) -> list[int]:
        y = self.train_y if split == "train" else self.test_y
        return np.bincount(y, minlength=len(self.classes)).tolist()


def channel_mean_std(x: np.ndarray, chunk: int = 2048) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std in [0, 1] units of N x 3 x H x W uint8 images.

    Sums of pixel values and of their squares are accumulated as exact integers, chunk
    by chunk, so the result does not depend on summation order and no float copy of the
    whole split is made (the full CIFAR-10 train split would need 1.2 GB as float64)."""
    total = np.zeros(x.shape[1], dtype=np.uint64)
    squares = np.zeros(x.shape[1], dtype=np.uint64)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].reshape(-1, x.shape[1], x.shape[2] * x.shape[3]).astype(np.uint32)
        total += part.sum(axis=(0, 2), dtype=np.uint64)
        squares += (part * part).sum(axis=(0, 2), dtype=np.uint64)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    means, stds = [], []
    for s, q in zip(map(int, total), map(int, squares), strict=True):
        means.append(s / (n * 255))
        stds.append(((q * n - s * s) / (n * n * 255 * 255)) ** 0.5)  # exact integer variance
    return means, stds


def validation_split(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), both sorted: `n_val` images held out of a
    training split, class-balanced (n_val // classes per class, one more for the first
    n_val % classes classes), chosen by `seed` alone, so every stage that carves the split
    gets the same one. ValueError when a class would give up all its images."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    share = np.full(len(classes), n_val // len(classes))
    share[: n_val % len(classes)] += 1
    if (share >= counts).any():
        c = int(classes[np.argmax(share >= counts)])
        raise ValueError(
            f"{n_val} validation images need {int(share.max())} of class {c}, which has only "
            f"{int(counts[classes == c][0])} training images"
        )
    rng = np.random.default_rng(seed)
    val_idx = np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, share, strict=True)])
    )
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx
