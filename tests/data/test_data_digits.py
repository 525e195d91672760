"""The embedded data set (scikit-learn's handwritten digits), fully offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from amoc.data import digits


def load(out: Path, split: str):
    with np.load(out / f"{split}.npz", allow_pickle=False) as blob:
        return blob["x"], blob["y"]


def test_digits_stage(run_download, tmp_path):
    code, out, err = run_download("data.name=digits")
    assert code == 0, err
    assert "1,442 train / 355 test" in out
    prepared = tmp_path / "prepared"
    x, y = load(prepared, "train")
    xt, yt = load(prepared, "test")
    assert x.shape == (1442, 3, 32, 32) and xt.shape == (355, 3, 32, 32)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    assert x.max() == 255 and x.min() == 0
    assert (x[:, 0] == x[:, 1]).all() and (x[:, 0] == x[:, 2]).all()  # grey in 3 channels
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["source"] == "sklearn.datasets.load_digits" and stats["checksum"] is None
    assert stats["classes"] == [str(i) for i in range(10)] and stats["num_classes"] == 10
    assert stats["counts"] == {"train": 1442, "test": 355}
    assert stats["per_class"]["test"] == np.bincount(yt, minlength=10).tolist()
    assert all(34 <= n <= 37 for n in stats["per_class"]["test"])  # stratified
    assert stats["image_shape"] == [3, 32, 32]
    flat = x[:, 0].reshape(-1) / 255.0
    assert np.allclose(stats["mean"], [flat.mean()] * 3) and np.allclose(stats["std"], [flat.std()] * 3)


def test_digits_are_the_real_ones_upsampled():
    real = load_digits()
    splits = digits.load()
    # the first training image is sklearn's image 0 (rank 0 of its class stays in train)
    assert splits.train_y[0] == real.target[0]
    block = splits.train_x[0, 0]
    expected = np.rint(real.images[0] * 255 / 16).astype(np.uint8)
    assert np.array_equal(block[::4, ::4], expected)  # nearest neighbour: 4x4 blocks
    assert np.array_equal(block, np.kron(expected, np.ones((4, 4), np.uint8)))
    # every 5th image of each class (ranks 4, 9, ...) is in test, in the original order
    first_zero_ranks = np.flatnonzero(real.target == 0)
    assert np.array_equal(
        splits.test_x[splits.test_y == 0][0, 0, ::4, ::4],
        np.rint(real.images[first_zero_ranks[4]] * 255 / 16).astype(np.uint8),
    )


def test_digits_deterministic(run_download, tmp_path):
    assert run_download("data.name=digits", out="a")[0] == 0
    assert run_download("data.name=digits", "data.source=ignored", out="b")[0] == 0
    for split in ("train", "test"):
        (xa, ya), (xb, yb) = load(tmp_path / "a", split), load(tmp_path / "b", split)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert (tmp_path / "a/stats.json").read_bytes() == (tmp_path / "b/stats.json").read_bytes()


def test_digits_limits(run_download, tmp_path):
    assert run_download("data.name=digits", "data.train_limit=100", "data.test_limit=20")[0] == 0
    _, y = load(tmp_path / "prepared", "train")
    _, yt = load(tmp_path / "prepared", "test")
    full = digits.load()
    assert np.array_equal(y, full.train_y[:100]) and np.array_equal(yt, full.test_y[:20])
    assert len(set(y.tolist())) == 10  # the original order mixes classes
