"""Image folders <root>/{train,test}/<class>/*.png|jpg, as a folder or a tar.gz."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CIFAR10_CLASSES, JPEG_MD5, SUBSET_SHA256, sha256_of, tar_folder
from PIL import Image

from amoc.data import cifar

COUNTS = {"cat": (12, 3), "dog": (5, 4), "ant": (7, 2)}  # ant sorts first: index 0


def load(out: Path, split: str):
    with np.load(out / f"{split}.npz", allow_pickle=False) as blob:
        return blob["x"], blob["y"]


def check_small(out: Path) -> None:
    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"] == ["ant", "cat", "dog"]
    assert stats["counts"] == {"train": 24, "test": 9}
    assert stats["per_class"] == {"train": [7, 12, 5], "test": [2, 3, 4]}
    assert stats["image_shape"] == [3, 32, 32] and stats["name"] == "folder"
    x, y = load(out, "train")
    assert x.shape == (24, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    # round robin over classes: the k-th image of every class, then the (k+1)-th
    assert y[:9].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    # class c was drawn with red = 20 * (c's position in the sorted names)
    assert all(int(x[i, 0, 0, 0]) == 20 * int(y[i]) for i in range(len(y)))
    # files in natural order: green = file index 0, 1, 2, ..., 10, 11 (not 0, 1, 10, 11, 2)
    cat = x[y == 1][:, 1, 0, 0].tolist()
    assert cat == list(range(12))
    # computed mean/std of the train split, in [0, 1] units
    flat = x.transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    assert np.allclose(stats["mean"], flat.mean(axis=1)) and np.allclose(stats["std"], flat.std(axis=1))
    x_test, _ = load(out, "test")
    assert (x_test[:, 2] == 255).all() and (x[:, 2] == 0).all()  # blue marks the split


@pytest.mark.parametrize("arcname", ["my-set", ""], ids=["root-one-level-down", "root-at-top"])
def test_tar_gz(tmp_path, make_image_tree, run_download, arcname):
    tree = make_image_tree(tmp_path / "tree", COUNTS)
    (tree / "README.txt").write_text("ignored")
    (tree / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    (tree / "train" / "cat" / "._3.png").write_bytes(b"macOS resource fork, not a png")
    archive = tar_folder(tree, tmp_path / "set.tgz", arcname)
    code, out, err = run_download("data.name=folder", f"data.source={archive}", f"data.sha256={sha256_of(archive)}")
    assert code == 0, err
    assert "24 train / 9 test" in out
    check_small(tmp_path / "prepared")
    stats = json.loads((tmp_path / "prepared/stats.json").read_text())
    assert stats["checksum"] == f"sha256:{sha256_of(archive)}"


def test_plain_folder_relative_path(tmp_path, make_image_tree, run_download):
    make_image_tree(tmp_path / "tree", COUNTS)
    code, _, err = run_download("data.name=folder", "data.source=tree")
    assert code == 0, err
    check_small(tmp_path / "prepared")
    stats = json.loads((tmp_path / "prepared/stats.json").read_text())
    assert stats["source"] == "tree" and stats["checksum"] is None


def test_jpeg_files_and_limits(tmp_path, make_image_tree, run_download):
    make_image_tree(tmp_path / "tree", COUNTS, ext=".jpg")
    code, _, err = run_download("data.name=folder", "data.source=tree", "data.train_limit=5", "data.test_limit=3")
    assert code == 0, err
    stats = json.loads((tmp_path / "prepared/stats.json").read_text())
    assert stats["counts"] == {"train": 5, "test": 3}
    assert stats["per_class"] == {"train": [2, 2, 1], "test": [1, 1, 1]}  # balanced thanks to round robin


def test_other_image_sizes_and_modes(tmp_path, make_image_tree, run_download):
    tree = make_image_tree(tmp_path / "tree", {"a": (2, 1), "b": (2, 1)}, size=(20, 16))
    Image.new("L", (20, 16), 7).save(tree / "train" / "a" / "9.png")  # grey -> RGB
    Image.new("RGBA", (20, 16), (1, 2, 3, 4)).save(tree / "test" / "b" / "9.png")
    code, _, err = run_download("data.name=folder", "data.source=tree")
    assert code == 0, err
    x, y = load(tmp_path / "prepared", "train")
    assert x.shape == (5, 3, 16, 20)
    assert x[y == 0][-1].tolist() == np.full((3, 16, 20), 7).tolist()


def _one_line(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amoc download: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_errors(tmp_path, make_image_tree, run_download):
    tree = make_image_tree(tmp_path / "tree", {"a": (2, 1), "b": (2, 1)})
    # a test class without training images
    (tree / "test" / "zebra").mkdir()
    Image.new("RGB", (32, 32)).save(tree / "test" / "zebra" / "0.png")
    _one_line(*run_download("data.name=folder", "data.source=tree")[::2], "zebra", "no training images")
    (tree / "test" / "zebra" / "0.png").unlink()
    # mixed sizes
    Image.new("RGB", (31, 32)).save(tree / "test" / "a" / "5.png")
    _one_line(*run_download("data.name=folder", "data.source=tree")[::2], "test/a/5.png", "31x32", "one size")
    (tree / "test" / "a" / "5.png").unlink()
    # an undecodable file
    (tree / "train" / "b" / "7.png").write_bytes(b"not an image")
    _one_line(*run_download("data.name=folder", "data.source=tree")[::2], "train/b/7.png", "not a readable PNG/JPEG")
    (tree / "train" / "b" / "7.png").unlink()
    # a folder cannot be checksummed
    _one_line(
        *run_download("data.name=folder", "data.source=tree", "data.md5=" + "a" * 32)[::2], "cannot be checksummed"
    )
    # no test split
    for f in (tree / "test").rglob("*.png"):
        f.unlink()
    _one_line(*run_download("data.name=folder", "data.source=tree")[::2], "no test images")
    assert not (tmp_path / "prepared").exists()


def test_two_roots_refused(tmp_path, make_image_tree, run_download):
    make_image_tree(tmp_path / "two" / "one", {"a": (1, 1)})
    make_image_tree(tmp_path / "two" / "other", {"a": (1, 1)})
    _one_line(*run_download("data.name=folder", "data.source=two")[::2], "several places")


def test_empty_folder(tmp_path, run_download):
    (tmp_path / "empty").mkdir()
    _one_line(*run_download("data.name=folder", "data.source=empty")[::2], "no training images", "{train,test}")


def test_folder_needs_a_source(run_download):
    _one_line(*run_download("data.name=folder")[::2], "data.source is empty")


# --------------------------------------------------------------------------- the real JPEG archive
def test_full_cifar10_jpeg(shared_data, run_download, tmp_path):
    archive = shared_data / "cifar-10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not found; it sits next to the CIFAR-10 subset in shared/data")
    start = time.perf_counter()
    code, out, err = run_download("data.name=folder", f"data.source={archive.as_uri()}", f"data.md5={JPEG_MD5}")
    seconds = time.perf_counter() - start
    assert code == 0, err
    stats = json.loads((tmp_path / "prepared/stats.json").read_text())
    assert stats["counts"] == {"train": 50_000, "test": 10_000}
    assert stats["per_class"] == {"train": [5000] * 10, "test": [1000] * 10}
    assert stats["classes"] == CIFAR10_CLASSES  # sorted names = the official label order
    assert stats["checksum"] == f"md5:{JPEG_MD5}"
    assert np.allclose(stats["mean"], (0.4914, 0.4822, 0.4465), atol=2e-3)
    print(f"cifar-10-jpeg.tar.gz: amoc download took {seconds:.1f} s")  # no bound: shared CI machines vary
    # Same images as the exact subset, class by class in the official order (JPEG-lossy).
    subset = shared_data / "cifar-10-python-subset.tar.gz"
    if subset.is_file():
        exact = cifar.read_archive(subset, "cifar10", 1 << 30)
        x, y = load(tmp_path / "prepared", "test")
        for c in range(10):
            want = exact.test_x[exact.test_y == c].astype(np.float64)
            got = x[y == c][: len(want)].astype(np.float64)
            rmse = np.sqrt(((want - got) ** 2).mean(axis=(1, 2, 3)))
            assert rmse.max() < 25 and rmse.mean() < 12, (c, rmse.max(), rmse.mean())
        assert sha256_of(subset) == SUBSET_SHA256
