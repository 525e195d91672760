"""CIFAR python-version archives: the real subset, Python-2 pickles, CIFAR-100, and
pickles that try to run code."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CIFAR10_CLASSES, REPO, SUBSET_MD5, SUBSET_SHA256, sha256_of

from amoc.data import cifar
from amoc.data.prepared import CIFAR10_MEAN, CIFAR10_STD
from amoc.errors import DataError

SUBSET = "cifar-10-python-subset.tar.gz"
# Read from the subset file itself (pickle-level check) before being written down here.
TRAIN_FIRST = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
TEST_FIRST = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def load(out: Path, split: str):
    with np.load(out / f"{split}.npz", allow_pickle=False) as blob:
        return blob["x"], blob["y"]


def batch_from_archive(archive: Path, member: str) -> dict:
    with tarfile.open(archive) as tar:
        data = tar.extractfile(f"cifar-10-batches-py/{member}").read()
    return cifar.safe_loads(data, member)


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amoc download: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --------------------------------------------------------------------------- the real subset
@pytest.mark.parametrize("how", ["relative-path-sha256", "file-url-sha256", "file-url-md5"])
def test_subset_download(shared_data, run_download, tmp_path, how):
    archive = shared_data / SUBSET
    if how.startswith("relative"):
        source = os.path.relpath(archive, tmp_path)  # resolved against the current folder
        digest = f"data.sha256={SUBSET_SHA256}"
    else:
        source = archive.resolve().as_uri()
        digest = f"data.sha256={SUBSET_SHA256}" if how.endswith("sha256") else f"data.md5={SUBSET_MD5}"
    # the project's own params.yaml, with every data key pinned
    code, out, err = run_download(
        "data.name=cifar10",
        f"data.source={source}",
        digest,
        "data.train_limit=0",
        "data.test_limit=0",
        "runtime.progress=false",
        params_file=REPO / "params.yaml",
    )
    assert code == 0, err
    assert "5,085 train / 1,017 test" in out
    prepared = tmp_path / "prepared"
    assert sorted(p.name for p in prepared.iterdir()) == ["stats.json", "test.npz", "train.npz"]
    x_train, y_train = load(prepared, "train")
    x_test, y_test = load(prepared, "test")
    assert x_train.shape == (5085, 3, 32, 32) and x_train.dtype == np.uint8
    assert x_test.shape == (1017, 3, 32, 32) and y_test.dtype == np.int64
    # first labels: the official values, and the archive's own batches
    assert y_train[:10].tolist() == TRAIN_FIRST
    assert y_test[:10].tolist() == TEST_FIRST
    batch1 = batch_from_archive(archive, "data_batch_1")
    batch2 = batch_from_archive(archive, "data_batch_2")
    test_batch = batch_from_archive(archive, "test_batch")
    assert batch1["labels"][:10] == TRAIN_FIRST and test_batch["labels"][:10] == TEST_FIRST
    assert y_train[1017:1027].tolist() == batch2["labels"][:10]  # batches concatenated in order
    # pixels: rows are 1024 red, 1024 green, 1024 blue
    assert np.array_equal(x_train[0], batch1["data"][0].reshape(3, 32, 32))
    assert np.array_equal(x_test[-1], test_batch["data"][-1].reshape(3, 32, 32))
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["name"] == "cifar10" and stats["source"] == source
    assert stats["checksum"] == (f"md5:{SUBSET_MD5}" if how.endswith("md5") else f"sha256:{SUBSET_SHA256}")
    assert stats["classes"] == CIFAR10_CLASSES and stats["num_classes"] == 10
    assert stats["image_shape"] == [3, 32, 32]
    assert stats["counts"] == {"train": 5085, "test": 1017}
    assert stats["per_class"]["train"] == np.bincount(y_train, minlength=10).tolist()
    assert sum(stats["per_class"]["test"]) == 1017
    assert stats["mean"] == list(CIFAR10_MEAN) and stats["std"] == list(CIFAR10_STD)


def test_subset_labels_are_the_official_ones(shared_data):
    """The hard-coded first labels above, read straight from the file with plain pickle."""
    with tarfile.open(shared_data / SUBSET) as tar:
        first = pickle.loads(tar.extractfile("cifar-10-batches-py/data_batch_1").read())["labels"][:10]
        test = pickle.loads(tar.extractfile("cifar-10-batches-py/test_batch").read())["labels"][:10]
    assert first == TRAIN_FIRST and test == TEST_FIRST


def test_subset_limits(shared_data, run_download):
    code, out, err = run_download(
        f"data.source={shared_data / SUBSET}",
        f"data.sha256={SUBSET_SHA256}",
        "data.train_limit=100",
        "data.test_limit=10",
    )
    assert code == 0, err
    _, y_train = load(Path("prepared"), "train")
    _, y_test = load(Path("prepared"), "test")
    assert len(y_train) == 100 and y_test.tolist() == TEST_FIRST
    assert y_train[:10].tolist() == TRAIN_FIRST
    stats = json.loads(Path("prepared/stats.json").read_text())
    assert stats["counts"] == {"train": 100, "test": 10} and sum(stats["per_class"]["train"]) == 100


# --------------------------------------------------------------------------- Python-2 pickles
def py2_dumps(obj) -> bytes:
    """Protocol-2 stream as Python 2's cPickle wrote the official files: byte-string keys
    and values (BINSTRING) and arrays via numpy.core.multiarray._reconstruct."""
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b)

    def integer(v: int) -> None:
        out.extend(b"J" + struct.pack("<i", v))

    def write(o) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                write(k)
                write(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                write(v)
            out.extend(b"e")
        elif isinstance(o, str):
            string(o.encode("latin1"))
        elif isinstance(o, int):
            integer(o)
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            integer(0)
            out.extend(b"\x85")
            string(b"b")
            out.extend(b"\x87R(")
            integer(1)
            out.extend(b"(")
            for d in o.shape:
                integer(d)
            out.extend(b"tcnumpy\ndtype\n")
            string(b"u1")
            integer(0)
            integer(1)
            out.extend(b"\x87R(")
            integer(3)
            string(b"|")
            out.extend(b"NNN")
            integer(-1)
            integer(-1)
            integer(0)
            out.extend(b"tb\x89")
            string(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    write(obj)
    out.extend(b".")
    return bytes(out)


def test_py2_pickle_helper_is_what_numpy_reads():
    arr = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    loaded = pickle.loads(py2_dumps({"data": arr, "labels": [1, 2]}), encoding="bytes")
    assert set(loaded) == {b"data", b"labels"}  # byte-string keys, as in the official files
    assert np.array_equal(loaded[b"data"], arr)


def test_python2_pickles_read_like_protocol_4(make_cifar_tar, run_download, tmp_path):
    results = {}
    for kind, dumps in (("py2", py2_dumps), ("p4", lambda o: pickle.dumps(o, protocol=4))):
        archive = make_cifar_tar(tmp_path / f"{kind}.tar.gz", dumps=dumps, seed=3)
        code, _, err = run_download(f"data.source={archive}", f"data.sha256={sha256_of(archive)}", out=kind)
        assert code == 0, err
        results[kind] = [load(tmp_path / kind, s) for s in ("train", "test")]
        assert json.loads((tmp_path / kind / "stats.json").read_text())["classes"] == CIFAR10_CLASSES
    for (xa, ya), (xb, yb) in zip(results["py2"], results["p4"], strict=True):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert results["py2"][0][0].shape == (60, 3, 32, 32)


def test_cifar100(make_cifar_tar, run_download, tmp_path):
    archive = make_cifar_tar(tmp_path / "c100.tar.gz", name="cifar100", n=30)
    code, _, err = run_download("data.name=cifar100", f"data.source={archive}", f"data.md5={_md5(archive)}")
    assert code == 0, err
    stats = json.loads(Path("prepared/stats.json").read_text())
    assert stats["num_classes"] == 100 and stats["classes"][0] == "class000"
    assert stats["counts"] == {"train": 30, "test": 30}
    x, y = load(Path("prepared"), "train")
    assert y.tolist() == list(range(30))
    mean = x.reshape(30, 3, -1).transpose(1, 0, 2).reshape(3, -1).mean(axis=1) / 255
    assert np.allclose(stats["mean"], mean) and stats["mean"] != list(CIFAR10_MEAN)


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- hostile or broken pickles
class Payload:
    """Pickles to a call of `func(arg)`, run by any unrestricted unpickler."""

    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def payloads(marker: Path) -> dict:
    return {
        "os.system": (Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        "builtins.eval": (Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"), "builtins.eval"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_payload_really_runs_under_plain_pickle(tmp_path, kind):
    """Control: the payloads used below do run code when loaded without restrictions."""
    marker = tmp_path / "control"
    payload, _ = payloads(marker)[kind]
    pickle.loads(pickle.dumps({"data": payload}))
    assert marker.exists()


@pytest.mark.parametrize("member", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused(make_cifar_tar, run_download, tmp_path, kind, member):
    marker = tmp_path / "pwned"
    payload, global_name = payloads(marker)[kind]
    evil = pickle.dumps({"batch_label": "x", "labels": [0], "data": payload, "label_names": payload})
    archive = make_cifar_tar(tmp_path / "evil.tar.gz", members={member: evil})
    code, _, err = run_download(f"data.source={archive}", f"data.sha256={sha256_of(archive)}")
    assert_one_line_error(code, err, global_name, member, "refused")
    assert not marker.exists()
    assert not (tmp_path / "prepared").exists()


def test_restricted_unpickler_rejects_any_other_global():
    with pytest.raises(DataError, match=r"collections\.OrderedDict"):
        cifar.safe_loads(pickle.dumps({"data": __import__("collections").OrderedDict()}), "batch")


@pytest.mark.parametrize(
    "member, blob, needle",
    [
        ("data_batch_2", b"not a pickle at all", "not a valid pickled batch"),
        (
            "data_batch_2",
            pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}),
            "expected uint8 N x 3072",
        ),
        (
            "data_batch_2",
            pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}),
            "labels outside 0..9",
        ),
        ("data_batch_2", pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "must be 2 integers"),
        ("data_batch_2", pickle.dumps({"data": np.zeros((2, 3072), object), "labels": [0, 1]}), "expected uint8"),
        ("batches.meta", pickle.dumps({"names": []}), "no list of class names"),
        ("test_batch", None, "missing test_batch"),
    ],
)
def test_broken_batches(make_cifar_tar, run_download, tmp_path, member, blob, needle):
    archive = make_cifar_tar(tmp_path / "bad.tar.gz", members={member: blob})
    code, _, err = run_download(f"data.source={archive}", f"data.sha256={sha256_of(archive)}")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "prepared").exists()


def test_unsafe_member_in_cifar_archive(make_cifar_tar, run_download, tmp_path):
    link = tarfile.TarInfo("cifar-10-batches-py/readme.html")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = make_cifar_tar(tmp_path / "link.tar.gz", extra=[(link, None)])
    code, _, err = run_download(f"data.source={archive}", f"data.sha256={sha256_of(archive)}")
    assert_one_line_error(code, err, "readme.html", "symlink")
