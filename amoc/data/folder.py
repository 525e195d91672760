"""Image folders: `<root>/{train,test}/<class>/*.png|jpg|jpeg`, as a folder or a tar.

The root may be the folder/archive itself or one folder level down (archives usually
wrap everything in one top folder, e.g. `cifar-10-jpeg/train/airplane/0000.jpg`).
Images are decoded in memory straight from the tar stream; nothing is extracted.

Order: class index = position in the sorted class names of the train split; within a
class, files are in natural name order (2.png before 10.png). A split is stored
round-robin over classes (the 1st image of every class, then the 2nd, ...), so that
"the first N images" (data.train_limit, evaluate.n_images) are class-balanced instead
of N images of the first class.
"""

from __future__ import annotations

import io
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from amoc.data import safe_tar
from amoc.data.splits import Splits
from amoc.errors import DataError

SPLITS = ("train", "test")
EXTENSIONS = (".png", ".jpg", ".jpeg")
LAYOUT = "<root>/{train,test}/<class>/*.png|jpg|jpeg"

# split, class, file name, and the bytes (tar members, read while streaming) or a
# reader (files in a folder, read only when decoded)
Entry = tuple[str, str, str, "bytes | Callable[[], bytes]"]


def read(path: Path, max_bytes: int) -> Splits:
    files = _dir_files(path) if path.is_dir() else safe_tar.iter_files(path, max_bytes)
    entries = _layout(files, path)
    return _decode_splits(entries, path, max_bytes)


def _dir_files(root: Path) -> Iterator[tuple[tuple[str, ...], Callable[[], bytes]]]:
    """Files under a local folder (the user's own disk, so symlinks are followed)."""
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(folder).relative_to(root).parts
        for name in sorted(names):
            file = Path(folder) / name
            yield (*rel, name), (lambda f=file: _read_file(f))


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read ({exc.strerror or type(exc).__name__}); check the file and its permissions"
        ) from None


def _layout(files, source: Path) -> list[Entry]:
    """Keep the image files that match the layout; the bytes of tar members are read
    here, while the stream is positioned on them."""
    entries: list[Entry] = []
    roots: set[tuple[str, ...]] = set()
    for parts, read in files:
        if any(p.startswith(".") for p in parts):  # .DS_Store, ._x.jpg (macOS tar), .git
            continue
        if len(parts) < 3 or parts[-3] not in SPLITS or not parts[-1].lower().endswith(EXTENSIONS):
            continue
        root = parts[:-3]
        if len(root) > 1:
            continue
        roots.add(root)
        if len(roots) > 1:
            shown = ", ".join(sorted("/".join(r) + "/" if r else "(top level)" for r in roots))
            raise DataError(f"{source}: found {LAYOUT} in several places ({shown}); keep one data set per source")
        data = read() if isinstance(read, safe_tar.ReadMember) else read
        entries.append((parts[-3], parts[-2], parts[-1], data))
    if not any(e[0] == "train" for e in entries):
        raise DataError(f"{source}: no training images found; expected {LAYOUT} (the root may be one folder down)")
    if not any(e[0] == "test" for e in entries):
        raise DataError(f"{source}: no test images found; expected {LAYOUT} (the root may be one folder down)")
    return entries


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)), name


def _decode_splits(entries: list[Entry], source: Path, max_bytes: int) -> Splits:
    classes = sorted({cls for split, cls, _, _ in entries if split == "train"})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({cls for split, cls, _, _ in entries if split == "test"} - set(classes))
    if unknown:
        raise DataError(
            f"{source}: test classes {', '.join(unknown)} have no training images; "
            "every test class needs a train/<class>/ folder"
        )
    out = {}
    shape: tuple[int, int] | None = None
    for split in SPLITS:
        by_class: dict[str, list[Entry]] = defaultdict(list)
        for e in entries:
            if e[0] == split:
                by_class[e[1]].append(e)
        for files in by_class.values():
            files.sort(key=lambda e: _natural_key(e[2]))
        ordered = _round_robin([by_class[c] for c in classes])
        first = _decode(ordered[0], source, max_bytes)
        if shape is None:
            shape = first.shape[:2]
        x = np.empty((len(ordered), 3, *shape), dtype=np.uint8)
        for i, e in enumerate(ordered):
            img = first if i == 0 else _decode(e, source, max_bytes)
            if img.shape[:2] != shape:
                raise DataError(
                    f"{_where(e, source)}: image is {img.shape[1]}x{img.shape[0]}, but the first training "
                    f"image is {shape[1]}x{shape[0]}; resize all images to one size"
                )
            x[i] = img.transpose(2, 0, 1)
        y = np.array([index[e[1]] for e in ordered], dtype=np.int64)
        out[split] = (x, y)
    return Splits(classes, *out["train"], *out["test"])


def _round_robin(groups: list[list[Entry]]) -> list[Entry]:
    ordered = []
    for k in range(max(map(len, groups), default=0)):
        ordered.extend(g[k] for g in groups if k < len(g))
    return ordered


def _where(e: Entry, source: Path) -> str:
    return f"{source}: {e[0]}/{e[1]}/{e[2]}"


def _decode(e: Entry, source: Path, max_bytes: int) -> np.ndarray:
    """H x W x 3 uint8. Only PNG and JPEG decoders are enabled, and the size is checked
    before decoding, so a small file cannot expand into a huge bitmap."""
    data = e[3]() if callable(e[3]) else e[3]
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as im:
            if im.width * im.height * 3 > max_bytes:
                raise DataError(
                    f"{_where(e, source)}: {im.width}x{im.height} image is larger than "
                    f"data.max_member_mb={max_bytes // 2**20} when decoded; use smaller images"
                )
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"{_where(e, source)}: not a readable PNG/JPEG image ({type(exc).__name__}); remove or replace the file"
        ) from None
