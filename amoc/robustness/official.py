"""The official CIFAR-10-C / CIFAR-100-C archives, or a user's *-C tar: find, fetch, subset.

An archive holds `<corruption>.npy` (uint8, 5 * M x 32 x 32 x 3, severities 1..5 in
blocks of M test images) and `labels.npy`, in any folder. Every member is checked with
the data stage's rules (amoc.data.safe_tar: no absolute or '..' names, no links or
devices, size limit data.max_member_mb) before anything is read. Nothing is extracted
to disk and nothing is unpickled: each wanted .npy header is parsed with numpy's reader,
object dtypes are refused (the equivalent of np.load(allow_pickle=False)), and only the
first N images of each wanted severity are read.
"""

from __future__ import annotations

import math
import tarfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import numpy as np

from amoc.config import Config
from amoc.data import safe_tar
from amoc.data.fetch import hash_file
from amoc.errors import DataError
from amoc.robustness import fetch_resume

# data.name -> (data set, official URL, md5 published on Zenodo)
OFFICIAL = {
    "cifar10": (
        "CIFAR-10-C",
        "https://zenodo.org/record/2535967/files/CIFAR-10-C.tar",
        "56bf5dcef84df0e2308c6dcbcbbd8499",
    ),
    "cifar100": (
        "CIFAR-100-C",
        "https://zenodo.org/record/3555552/files/CIFAR-100-C.tar",
        "11f0ed0f1191edbf9fa23466ae6021d3",
    ),
}
ARCHIVE_SEVERITIES = 5


@dataclass(frozen=True)
class Archive:
    text: str  # as configured (or the official URL)
    url: str | None  # http(s) to download
    path: Path | None  # local file
    expected: dict[str, str]  # algorithm -> hex digest
    dataset: str | None  # "CIFAR-10-C" when data.name has an official set
    official_md5: str | None


def resolve(cfg: Config) -> Archive:
    """corruptions.source/md5/sha256 -> Archive; config problems are raised here, before any I/O."""
    c = cfg.corruptions
    dataset, official_url, official_md5 = OFFICIAL.get(cfg.data.name, (None, None, None))
    text = c.source.strip()
    if text == "official":
        if official_url is None:
            raise DataError(
                f"corruptions.source: official needs data.name cifar10 or cifar100; there is no official "
                f"corrupted set of {cfg.data.name} - use corruptions.source=generate"
            )
        text = official_url
    expected = {algo: digest.lower() for algo, digest in (("sha256", c.sha256), ("md5", c.md5)) if digest}
    if not expected and text == official_url:
        expected = {"md5": official_md5}
    if not expected:
        raise DataError(
            f"corruptions.source: {text!r} is a custom archive without a checksum; set corruptions.sha256 "
            "(or corruptions.md5) to its published digest, e.g. the output of `sha256sum FILE`"
        )
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in ("http", "https"):
        return Archive(text, text, None, expected, dataset, official_md5)
    if scheme == "file":
        parts = urllib.parse.urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise DataError(
                f"corruptions.source: {text!r} names host {parts.netloc!r}; use file:///absolute/path or a plain path"
            )
        path = Path(urllib.request.url2pathname(parts.path))
    elif scheme and len(scheme) > 1:
        raise DataError(
            f"corruptions.source: {text!r} uses the unsupported scheme {scheme}://; use generate, official, "
            "http(s)://, file:// or a local path"
        )
    else:
        path = Path(text)
    return Archive(text, None, path.expanduser().resolve(), expected, dataset, official_md5)


def fetch(archive: Archive, progress: bool) -> tuple[Path, dict[str, str]]:
    """(local verified archive, its digests: every expected one, and always md5)."""
    if archive.url is not None:
        key = "corruptions." + ("sha256" if "sha256" in archive.expected else "md5")
        print(f"amoc corruptions: fetching {archive.url} (resumable, kept in {fetch_resume.cache_dir()})", flush=True)
        return fetch_resume.download(archive.url, archive.expected, key=key, progress=progress, also=("md5",))
    path = archive.path
    assert path is not None
    if not path.is_file():
        raise DataError(f"corruptions.source: {path} is not a file; point it at a *-C .tar archive")
    actual = hash_file(path, tuple(sorted(set(archive.expected) | {"md5"})))
    for algo, digest in archive.expected.items():
        if actual[algo] != digest:
            raise DataError(
                f"{path}: {algo} mismatch: expected {digest}, got {actual[algo]}; the file is corrupt or "
                f"not the expected archive - fetch it again or correct corruptions.{algo}"
            )
    return path, actual


def read(
    path: Path,
    names: list[str],
    severities: list[int],
    n_images: int,
    max_bytes: int,
    on_array: Callable[[str, np.ndarray], None],
) -> tuple[np.ndarray, int]:
    """Stream the archive once; hand each wanted corruption's (S * N) x H x W x 3 subset to
    `on_array` as soon as it is read. Returns (labels S * N int64, N)."""
    wanted = {f"{name}.npy": name for name in names} | {"labels.npy": ""}
    seen: dict[str, int] = {}  # member basename -> images per severity
    labels = None
    with safe_tar.open_archive(path) as tar:
        try:
            for member in tar:
                safe_tar.check_member(member, path, max_bytes)
                base = safe_tar.member_parts(member.name)[-1] if member.isfile() else ""
                if base not in wanted:
                    continue
                if base in seen:
                    raise DataError(f"{path}: {base} appears twice in the archive; use the official archive")
                handle = tar.extractfile(member)
                assert handle is not None
                where = f"{path}:{member.name}"
                array, seen[base] = _read_blocks(handle, member.size, where, severities, n_images, base == "labels.npy")
                if base == "labels.npy":
                    labels = array
                else:
                    on_array(wanted[base], array)
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise DataError(
                f"{path}: corrupt or truncated archive ({type(exc).__name__}: {exc}); download it again"
            ) from None
    missing = sorted(set(wanted) - set(seen))
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; a *-C archive holds <corruption>.npy and labels.npy")
    if len(set(seen.values())) != 1:
        raise DataError(
            f"{path}: members hold different numbers of images per severity ({sorted(set(seen.values()))}); "
            "the archive is not one consistent *-C set"
        )
    n = (labels.shape[0] // len(severities)) if labels is not None else 0
    blocks = labels.reshape(len(severities), n)
    if not (blocks == blocks[:1]).all():
        raise DataError(f"{path}: labels.npy differs between severity blocks; the archive is not a *-C set")
    return labels.astype(np.int64), n


def _read_blocks(
    fh: IO[bytes], size: int, where: str, severities: list[int], n_images: int, is_labels: bool
) -> tuple[np.ndarray, int]:
    """The first n_images rows of each severity block of one .npy member, and M."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise DataError(f"{where}: .npy format version {version} is not supported; expected 1.0 or 2.0")
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects; refused (only plain numeric arrays are read, never pickles)")
    ok = (
        (dtype.kind in "iu" and len(shape) == 1)
        if is_labels
        else (dtype == np.uint8 and len(shape) == 4 and shape[3] == 3)
    )
    if fortran or not ok or shape[0] % ARCHIVE_SEVERITIES:
        expected = "integer labels (5 * M,)" if is_labels else "uint8 (5 * M) x H x W x 3"
        raise DataError(f"{where}: expected {expected} in C order, got {dtype} {tuple(shape)}; not a *-C archive")
    per = shape[0] // ARCHIVE_SEVERITIES
    n = n_images or per
    if n > per:
        raise DataError(
            f"corruptions.n_images: {n} but {where} holds only {per} images per severity; lower it (0 = all)"
        )
    row = dtype.itemsize * math.prod(shape[1:])
    start = fh.tell()
    if size < start + shape[0] * row:
        raise DataError(f"{where}: truncated ({size} bytes for a {tuple(shape)} array); download the archive again")
    blocks = []
    for severity in severities:
        fh.seek(start + (severity - 1) * per * row)
        data = fh.read(n * row)
        if len(data) != n * row:
            raise DataError(f"{where}: truncated; download the archive again")
        blocks.append(np.frombuffer(data, dtype=dtype).reshape((n,) + tuple(shape[1:])))
    return np.concatenate(blocks), per
