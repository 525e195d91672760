"""The embedded data set: scikit-learn's 1,797 real 8x8 handwritten digits (offline).

Pixels 0..16 are scaled to 0..255 and upsampled 4x to 32x32 by nearest neighbour
(each pixel becomes a 4x4 block): exact, reproducible across library versions, and it
keeps the 32x32 input size the CIFAR ResNet expects. Grey is replicated to 3 channels.
Split: within each class, every 5th image (ranks 4, 9, 14, ...) goes to test, which
gives a deterministic, stratified 1,442 / 355 split in the original order.
"""

from __future__ import annotations

import numpy as np

from amoc.data.splits import Splits

SOURCE = "sklearn.datasets.load_digits"
UPSAMPLE = 4


def load() -> Splits:
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

    digits = load_digits()
    y = digits.target.astype(np.int64)
    x8 = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # N x 8 x 8
    x32 = x8.repeat(UPSAMPLE, axis=1).repeat(UPSAMPLE, axis=2)  # N x 32 x 32
    x = np.ascontiguousarray(np.repeat(x32[:, None], 3, axis=1))  # N x 3 x 32 x 32
    rank = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        rank[members] = np.arange(len(members))
    test = rank % 5 == 4
    classes = [str(c) for c in range(10)]
    return Splits(classes, x[~test], y[~test], x[test], y[test])
