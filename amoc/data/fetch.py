"""Find a data source, download it if it is remote, and verify its checksum.

Sources are an http(s):// URL, a file:// URL or a plain local path. Local files are
hashed where they lie (never copied). Remote files are streamed into a `.part` file in
a private work folder and renamed only after the digest matches, so an interrupted or
corrupt download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from amoc.config import DataConfig
from amoc.errors import DataError

# name -> (official URL, its md5), from the CIFAR home page.
OFFICIAL = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
CHUNK = 1 << 20
TIMEOUT_S = 60  # per socket operation; a stalled server fails instead of hanging forever
# sha256 first: the tag recorded in stats.json is the strongest digest that was checked.
ALGORITHMS = ("sha256", "md5")


@dataclass(frozen=True)
class Source:
    text: str  # as the user gave it (or the official URL); goes into stats.json
    url: str | None = None  # http(s) URL to download
    path: Path | None = None  # local file or folder
    expected: dict[str, str] = field(default_factory=dict)  # algorithm -> lower-case hex digest
    key: str = "data"  # the params section, for error messages


def resolve(data: DataConfig) -> Source:
    """The data stage's source from data.name/source/md5/sha256, checked before any
    download or read starts."""
    official_url, official_md5 = OFFICIAL.get(data.name, (None, None))
    if not data.source.strip() and official_url is None:
        raise DataError(
            f"data.source is empty and data.name={data.name} has no official download; "
            "set data.source to a folder or a .tar.gz of <root>/{train,test}/<class>/*.png|jpg"
        )
    folder_ok = data.name == "folder"
    why = (
        ""
        if folder_ok
        else f", but data.name={data.name} needs the python-version archive (.tar.gz); point data.source at the archive"
    )
    return resolve_source(
        data.source,
        data.md5,
        data.sha256,
        official=(official_url, official_md5) if official_url else None,
        key="data",
        allow_dir=folder_ok,
        dir_hint=why,
    )


def resolve_source(
    text: str,
    md5: str = "",
    sha256: str = "",
    *,
    official: tuple[str, str] | None = None,
    key: str = "data",
    allow_dir: bool = False,
    dir_hint: str = "",
) -> Source:
    """A Source from a URL or path plus optional digests (reusable by other stages).

    `text` "" means the official (url, md5); a custom archive must come with a digest,
    because an unverified file would be parsed as trusted data."""
    text = text.strip() or (official[0] if official else "")
    if not text:
        raise DataError(f"{key}.source is empty; set it to an http(s):// URL, a file:// URL or a local path")
    expected = {algo: digest.lower() for algo, digest in (("sha256", sha256), ("md5", md5)) if digest}
    if not expected and official and text == official[0]:
        expected = {"md5": official[1]}
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in ("http", "https"):
        source = Source(text, url=text, expected=expected, key=key)
    elif scheme == "file":
        source = Source(text, path=_file_url_path(text, key), expected=expected, key=key)
    elif scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise DataError(
            f"{key}.source: {text!r} uses the unsupported scheme {scheme}://; use http(s)://, file:// or a local path"
        )
    else:
        source = Source(text, path=Path(text).expanduser().resolve(), expected=expected, key=key)
    if source.path is not None and not source.path.exists():
        raise DataError(
            f"{key}.source: {source.path} does not exist; check the path (relative paths start at the current folder)"
        )
    if source.path is not None and source.path.is_dir():
        if not allow_dir:
            raise DataError(
                f"{key}.source: {source.path} is a "
                f"folder{dir_hint or ', but an archive is needed; point it at the archive file'}"
            )
        if expected:
            raise DataError(
                f"{key}.source: {source.path} is a folder and cannot be checksummed; "
                f"clear {key}.md5/{key}.sha256 or point {key}.source at an archive"
            )
    elif not expected:
        raise DataError(
            f"{key}.source: {text!r} is a custom archive without a checksum; set {key}.sha256 "
            f"(or {key}.md5) to its published digest, e.g. the output of `sha256sum FILE`"
        )
    return source


def _file_url_path(url: str, key: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise DataError(
            f"{key}.source: {url!r} names host {parts.netloc!r}; a file:// URL needs an absolute path "
            "such as file:///data/x.tar.gz (or give a plain path)"
        )
    return Path(urllib.request.url2pathname(parts.path)).expanduser().resolve()


def fetch(source: Source, workdir: Path, progress: bool) -> tuple[Path, str | None]:
    """Return (local path of the verified source, "algo:digest" or None for a folder)."""
    if source.url is not None:
        return _download(source, workdir, progress)
    path = source.path
    assert path is not None
    if not path.exists():
        raise DataError(
            f"{source.key}.source: {path} does not exist; check the path (relative paths start at the current folder)"
        )
    if path.is_dir():
        return path, None
    digests = hash_file(path, source.expected)
    return path, verify(path, source.expected, digests, source.key)


def hash_file(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    hashes = {a: hashlib.new(a, usedforsecurity=False) for a in algorithms}
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                for h in hashes.values():
                    h.update(chunk)
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read ({exc.strerror or type(exc).__name__}); check the file and its permissions"
        ) from None
    return {a: h.hexdigest() for a, h in hashes.items()}


def verify(path: Path | str, expected: dict[str, str], actual: dict[str, str], key: str = "data") -> str:
    """Raise on the first mismatch; return the strongest verified digest as "algo:hex"."""
    for algo in ALGORITHMS:
        if algo in expected and actual[algo] != expected[algo]:
            raise DataError(
                f"{path}: {algo} mismatch: expected {expected[algo]}, got {actual[algo]}; the file is "
                f"corrupt or not the expected one - fetch it again or correct {key}.{algo}"
            )
    algo = next(a for a in ALGORITHMS if a in expected)
    return f"{algo}:{actual[algo]}"


def _download(source: Source, workdir: Path, progress: bool) -> tuple[Path, str]:
    url = source.url
    assert url is not None
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.urlsplit(url).path).name) or "download"
    part = workdir / f"{name}.part"
    hashes = {a: hashlib.new(a, usedforsecurity=False) for a in source.expected}
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(part, "wb") as fh:
            total = content_length(response)
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=name,
                disable=not progress,
                file=sys.stderr,
                leave=False,
            ) as bar:
                while chunk := response.read(CHUNK):
                    fh.write(chunk)
                    for h in hashes.values():
                        h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise DataError(f"{url}: download interrupted after {received} of {total} bytes; rerun to try again")
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise DataError(
            f"{url}: download failed with HTTP {exc.code} {exc.reason}; check {source.key}.source"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        part.unlink(missing_ok=True)
        reason = (
            exc.reason if isinstance(exc, urllib.error.URLError) else exc.strerror or str(exc) or type(exc).__name__
        )
        what = f"download interrupted after {received} bytes" if received else "download failed"
        raise DataError(f"{url}: {what} ({reason}); check the network and the URL, then rerun") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    try:
        digest = verify(url, source.expected, {a: h.hexdigest() for a, h in hashes.items()}, source.key)
    except DataError:
        part.unlink(missing_ok=True)
        raise
    final = workdir / name
    part.replace(final)  # only a verified download gets its real name
    return final, digest


def content_length(response) -> int | None:
    """The response's Content-Length, or None when it is absent or not a count."""
    try:
        value = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return value if value >= 0 else None
