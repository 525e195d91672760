"""CIFAR-10/100 "python version" archives: pickled batches, read without running code.

A pickle can call any importable function while it loads (`os.system`, `eval`, ...),
so the batches are loaded with an Unpickler that resolves only the few numpy globals
needed to rebuild an array and refuses everything else by name. The official files are
Python-2 pickles (byte-string keys and data); `encoding="latin1"` reads those as str,
which numpy turns back into the exact bytes, and reads protocol-4 re-packs unchanged.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from amoc.data import safe_tar
from amoc.data.splits import Splits
from amoc.errors import DataError


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2 keeps the implementation in numpy._core; numpy.core is a shim
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed = {}
    # Both module spellings occur: numpy 1.x / Python-2 files say numpy.core, numpy 2 numpy._core.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar  # numpy scalars (e.g. an np.int64 label)
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


_ALLOWED = _numpy_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy's array-reconstruction globals; anything else is refused."""

    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.where}: refused to unpickle: it calls the global {module}.{name}, which a "
                "data batch never needs (the file may be malicious); use the official archive"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.where}: refused to unpickle: it uses persistent ids; use the official archive")


def safe_loads(data: bytes, where: str) -> Any:
    """Unpickle `data` allowing nothing but plain containers and numpy arrays."""
    try:
        obj = RestrictedUnpickler(data, where).load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{where}: not a valid pickled batch ({type(exc).__name__}); the archive is corrupt or "
            "not a CIFAR python-version archive"
        ) from None
    return _str_keys(obj)


def _str_keys(obj: Any) -> Any:
    """Python-2 files may use byte-string keys and values; make keys and names str."""
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): _str_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [v.decode("latin1") if isinstance(v, bytes) else v for v in obj]
    return obj


# Per data set: member basenames of each split (in order), the meta file, and the keys.
LAYOUTS = {
    "cifar10": {
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "names": "label_names",
        "labels": "labels",
    },
    "cifar100": {
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "names": "fine_label_names",
        "labels": "fine_labels",
    },
}


def read_archive(path: Path, name: str, max_bytes: int) -> Splits:
    layout = LAYOUTS[name]
    wanted = set(layout["train"]) | set(layout["test"]) | {layout["meta"]}
    found: dict[str, Any] = {}
    # Stream the archive once; each needed member is unpickled as soon as it is read.
    for parts, read in safe_tar.iter_files(path, max_bytes):
        base = parts[-1]
        if base not in wanted:
            continue
        if base in found:
            raise DataError(f"{path}: {base} appears twice in the archive; use the official archive")
        found[base] = safe_loads(read(), f"{path}:{'/'.join(parts)}")
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(
            f"{path}: missing {', '.join(missing)}; data.name={name} needs the CIFAR "
            f"python-version archive ({'cifar-10' if name == 'cifar10' else 'cifar-100'}-python.tar.gz)"
        )
    classes = _class_names(found[layout["meta"]], layout["names"], f"{path}:{layout['meta']}")
    splits = {}
    for split in ("train", "test"):
        batches = [_batch(found[b], layout["labels"], len(classes), f"{path}:{b}") for b in layout[split]]
        splits[split] = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    return Splits(classes, *splits["train"], *splits["test"])


def _class_names(meta: Any, key: str, where: str) -> list[str]:
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(
            f"{where}: no list of class names under {key!r}; the archive is not a CIFAR python-version archive"
        )
    return names


def _batch(batch: Any, label_key: str, num_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 3 x 32 x 32 uint8, labels N int64) of one batch, after checking its shape."""
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise DataError(
            f"{where}: expected a dict with 'data' and {label_key!r}; the archive is not a CIFAR python-version archive"
        )
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"{where}: 'data' is {desc}, expected uint8 N x 3072; the archive is not a CIFAR python-version archive"
        )
    labels = np.asarray(batch[label_key])
    if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise DataError(f"{where}: {label_key!r} must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{where}: labels outside 0..{num_classes - 1}; the archive is corrupt")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue), i.e. already C x H x W.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)
