"""Shared fixtures: the repo root, the real CIFAR-10 subset (skipped when absent)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """Modules with `slow` tests first, the most first: `make test` hands whole modules to
    two pytest-xdist workers in this order, so the 16-minute DVC/Snakemake module starts at
    once on one worker while the other runs everything else."""
    slow = Counter(item.module.__name__ for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.module.__name__])  # stable: keeps the order within


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def params(tmp_path_factory) -> Path:
    """The repo's params.yaml with the tiny preset applied, written by `amoc params` itself
    (read-only for tests: copy it to change it)."""
    from amoc import cli

    path = tmp_path_factory.mktemp("params") / "tiny.yaml"
    assert cli.main(["params", "--params", str(REPO / "params.yaml"), "--preset", "tiny", "--out", str(path)]) == 0
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread in every test module: the tensors are tiny, a second OpenMP thread
    only adds barrier waits (very slow when the CPU is shared), and exact-resume and
    byte-identity comparisons need a fixed thread count. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The embedded digits data set, prepared once by `amoc download` (offline)."""
    from amoc import cli

    out = tmp_path_factory.mktemp("digits") / "prepared"
    assert (
        cli.main(["download", "--params", str(REPO / "params.yaml"), "--set", "data.name=digits", "--out", str(out)])
        == 0
    )
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder holding ../shared/data's real archives (or $AMOC_SHARED_DATA)."""
    folder = Path(os.environ.get("AMOC_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not (folder / "cifar-10-python-subset.tar.gz").is_file():
        pytest.skip(f"real CIFAR-10 subset not found in {folder}; set AMOC_SHARED_DATA to the shared/data folder")
    return folder


SUBSET_SHA256 = "f1c898c7ca14db7a3a2c6cacfb3057ebab65ea258d0842fb86712666b62d7b01"
SUBSET_MD5 = "64d2c6eb85d0e40bc46b0fc02fd3a5d6"
JPEG_SHA256 = "d6b111c178e2bf2b4eec9c8634057a1f2f368b5d64fb5e56e31865acecd566c9"


# --------------------------------------------------------------------------- data stage
# Builders for small, synthetic archives (tests/test_data_*.py); nothing here touches the
# network or the real data.
JPEG_MD5 = "23b5390436017533c423df5271effe34"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _tar_add_bytes(tar, name: str, data: bytes) -> None:
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def make_cifar_tar():
    """make(path, name="cifar10", n=12, members={basename: bytes}, dumps=pickle.dumps,
    extra=[(TarInfo, bytes|None)]) -> path: a CIFAR python-version archive of random
    images; `members` replaces batches by raw bytes (None drops one)."""
    import io
    import pickle
    import tarfile

    import numpy as np

    def make(
        path: Path,
        name: str = "cifar10",
        n: int = 12,
        members: dict | None = None,
        dumps=lambda obj: pickle.dumps(obj, protocol=4),
        extra=(),
        seed: int = 0,
    ) -> Path:
        rng = np.random.default_rng(seed)
        if name == "cifar10":
            top, label_key = "cifar-10-batches-py", "labels"
            batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
            meta_name, meta = "batches.meta", {"label_names": CIFAR10_CLASSES, "num_vis": 3072}
            classes = 10
        else:
            top, label_key = "cifar-100-python", "fine_labels"
            batches, meta_name, classes = ["train", "test"], "meta", 100
            meta = {"fine_label_names": [f"class{i:03d}" for i in range(100)], "coarse_label_names": ["x"] * 20}
        blobs = {}
        for b, batch in enumerate(batches):
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            labels = [(b * 7 + i) % classes for i in range(n)]
            blobs[batch] = dumps(
                {
                    "batch_label": batch,
                    label_key: labels,
                    "data": data,
                    "filenames": [f"{batch}_{i}.png" for i in range(n)],
                }
            )
        blobs[meta_name] = dumps(meta)
        blobs.update(members or {})
        with tarfile.open(path, "w:gz") as tar:
            for member, data in blobs.items():
                if data is not None:  # None in `members` leaves the batch out
                    _tar_add_bytes(tar, f"{top}/{member}", data)
            for info, data in extra:
                tar.addfile(info, None if data is None else io.BytesIO(data))
        return path

    return make


@pytest.fixture
def make_image_tree():
    """make(root, counts={class: (n_train, n_test)}, size=(32, 32), ext=".png") -> root:
    <root>/{train,test}/<class>/<i>.<ext> with images whose red channel holds the class
    index and green channel the file index (so the order can be checked)."""
    import numpy as np
    from PIL import Image

    def make(root: Path, counts: dict, size=(32, 32), ext: str = ".png") -> Path:
        for c, (cls, per_split) in enumerate(sorted(counts.items())):
            for split, n in zip(("train", "test"), per_split, strict=True):
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    img = np.zeros((size[1], size[0], 3), dtype=np.uint8)
                    img[..., 0], img[..., 1], img[..., 2] = c * 20, i, 255 if split == "test" else 0
                    Image.fromarray(img).save(folder / f"{i}{ext}", quality=100)
        return root

    return make


def tar_folder(src: Path, dest: Path, arcname: str = "") -> Path:
    """dest (.tar.gz) holding src's contents under `arcname` ("" = at the top)."""
    import tarfile

    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            tar.add(path, arcname=f"{arcname}/{rel}" if arcname else rel, recursive=False)
    return dest


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def run_download(tmp_path, capsys, monkeypatch):
    """run(*overrides, out="prepared") -> (exit code, stdout, stderr) of `amoc download`
    in tmp_path, with a minimal params.yaml (defaults, no progress bars)."""
    from amoc.cli import main

    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("runtime:\n  progress: false\n")

    def run(*overrides: str, out: str | Path = "prepared", params_file: Path = params):
        argv = ["download", "--params", str(params_file), "--out", str(out)]
        for item in overrides:
            argv += ["--set", item]
        capsys.readouterr()
        code = main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
