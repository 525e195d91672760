"""`amoc download`: fetch and verify a data set, write train.npz, test.npz, stats.json.

All or nothing: the previous outputs are removed first, everything is built in memory,
and the three files are written atomically; if anything fails (a bad source included),
none of them remains, nor any temp or download file, so a later stage never reads a mix
of runs or the outputs of other params. Files that are not ours are left alone.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from amoc.config import Config
from amoc.data import cifar, digits, fetch, folder
from amoc.data.prepared import CIFAR10_MEAN, CIFAR10_STD, SPLITS, split_path
from amoc.data.splits import Splits, channel_mean_std
from amoc.errors import DataError
from amoc.io import stage_outputs, write_bytes, write_json

OUTPUTS = ("train.npz", "test.npz", "stats.json")
WORK_PREFIX = ".amoc-download-"


def run(cfg: Config, args: Any) -> int:
    start = time.perf_counter()
    data = cfg.data
    out = Path(args.out)
    max_bytes = data.max_member_mb * 2**20
    with _output_folder(out) as work:
        if data.name == "digits":
            if data.source.strip():
                print(f"amoc download: note: data.source is ignored for data.name=digits (embedded in {digits.SOURCE})")
            splits, text, checksum = digits.load(), digits.SOURCE, None
        else:
            source = fetch.resolve(data)
            path, checksum = fetch.fetch(source, work, cfg.runtime.progress)
            text = source.text
            splits = (
                folder.read(path, max_bytes)
                if data.name == "folder"
                else cifar.read_archive(path, data.name, max_bytes)
            )
        splits = splits.limited(data.train_limit, data.test_limit)
        stats = make_stats(data.name, text, checksum, splits)
        _write(out, splits, stats)
    c = stats["counts"]
    print(
        f"amoc download: {data.name}: {c['train']:,} train / {c['test']:,} test images, "
        f"{stats['num_classes']} classes, {'x'.join(map(str, stats['image_shape']))} -> {out} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


def make_stats(name: str, source: str, checksum: str | None, splits: Splits) -> dict[str, Any]:
    if len(splits.train_y) == 0 or len(splits.test_y) == 0:
        raise DataError(
            f"{source}: the {'train' if len(splits.train_y) == 0 else 'test'} split is empty; "
            "a data set needs training and test images"
        )
    if name == "cifar10":
        mean, std = list(CIFAR10_MEAN), list(CIFAR10_STD)  # the paper's constants, whatever the subset
    else:
        mean, std = channel_mean_std(splits.train_x)
    return {
        "name": name,
        "source": source,
        "checksum": checksum,
        "classes": list(splits.classes),
        "num_classes": len(splits.classes),
        "image_shape": list(splits.train_x.shape[1:]),
        "counts": {"train": int(len(splits.train_y)), "test": int(len(splits.test_y))},
        "per_class": {"train": splits.per_class("train"), "test": splits.per_class("test")},
        "mean": mean,
        "std": std,
    }


@contextlib.contextmanager
def _output_folder(out: Path) -> Iterator[Path]:
    """amoc.io.stage_outputs for our three files, plus a private work folder for the
    download (work folders of killed runs are removed first)."""
    with stage_outputs(out, OUTPUTS):
        for leftover in out.glob(f"{WORK_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=out))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _write(out: Path, splits: Splits, stats: dict[str, Any]) -> None:
    arrays = {"train": (splits.train_x, splits.train_y), "test": (splits.test_x, splits.test_y)}
    for split in SPLITS:
        x, y = arrays[split]
        # In memory first (np.savez appends ".npz" to a bare path): a full disk's message
        # then says how much space the file needs.
        buffer = io.BytesIO()
        np.savez(buffer, x=np.ascontiguousarray(x), y=np.ascontiguousarray(y))
        write_bytes(split_path(out, split), buffer.getbuffer())
    write_json(out / "stats.json", stats)  # last: its presence marks a complete folder
